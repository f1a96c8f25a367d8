"""FaceXFormer: the official state_dict contract, the synthetic-weights rule and the reference forward.

The reference logits were computed by the official code with the synthetic weights described in
tests/data/README.md; the weights are rebuilt here (about a second), never stored. The stored logits and
intermediates are sub-sampled (every few rows and columns); the parsing is compared at every pixel.
"""
import hashlib
import json
import math
import zlib

import pytest
import torch
import torchvision

from ohlora.errors import PipelineError
from segmentation.facexformer import FaceXFormer, facexformer_from_state_dict, load_facexformer
from segmentation.facexformer_synthetic import (
    relative_position_index, synthetic_kind, synthetic_state_dict, synthetic_tensor)

HEADS = {'landmarks': 'landmarks', 'pose': 'headpose', 'attribute': 'attribute', 'visibility': 'visibility',
         'age': 'age', 'gender': 'gender', 'race': 'race'}


LOGITS_STRIDE = 5  # seg_logits_sub5: every 5th row and column


@pytest.fixture(scope='module')
def key_table(facexformer_dir):
    return json.loads((facexformer_dir / 'keys_facexformer.json').read_text())


@pytest.fixture(scope='module')
def synthetic():
    return synthetic_state_dict()


@pytest.fixture(scope='module')
def model(synthetic):
    return facexformer_from_state_dict(synthetic)


@pytest.fixture(scope='module')
def decoded(model, facexformer_ref):
    """Every output and the intermediates of the reference batch (both samples, batch 2, as the reference)."""
    with torch.inference_mode():
        stages = model.stage_features(facexformer_ref['input'])
        fused = model.fuse(stages)
        pe = model.pe_layer((56, 56))
        outputs = model.face_decoder(fused, pe)
    return {'stages': stages, 'fused': fused, 'pe': pe, **outputs}


def meta_state_dict():
    with torch.device('meta'):
        return FaceXFormer().state_dict()


def test_state_dict_matches_the_official_key_table(key_table):
    state = meta_state_dict()
    entries = key_table['keys']
    assert list(state) == [e['key'] for e in entries]  # same names, same order
    for e in entries:
        t = state[e['key']]
        assert list(t.shape) == e['shape'] and str(t.dtype).removeprefix('torch.') == e['dtype'], e['key']
    with torch.device('meta'):
        model = FaceXFormer()
    buffers = dict(model.named_buffers())
    assert sorted(buffers) == sorted(e['key'] for e in entries if e['kind'] == 'buffer')
    params = sum(p.numel() for p in model.parameters())
    assert params == key_table['totals']['parameter_numel'] == 91_985_943


def test_synthetic_rule_matches_the_reference_checksums(synthetic, key_table, facexformer_dir):
    meta = json.loads((facexformer_dir / 'ref_meta.json').read_text())
    for e in key_table['keys']:
        assert synthetic_kind(e['key'], tuple(e['shape']), getattr(torch, e['dtype'])) == e['synthetic_kind']
    for key, check in meta['weights_checks'].items():
        values = synthetic[key]
        assert values.double().sum().item() == pytest.approx(check['sum'], rel=1e-12, abs=1e-9)
        assert values.flatten()[:3].tolist() == check['first3']
    digest = hashlib.sha256()
    for e in key_table['keys']:
        if e['dtype'] == 'float32':
            digest.update(synthetic[e['key']].numpy().tobytes())
    assert digest.hexdigest() == meta['weights_float_sha256']


def test_relative_position_index_is_torchvisions():
    swin = torchvision.models.swin_b(weights=None)
    assert torch.equal(relative_position_index(), swin.features[1][0].attn.relative_position_index)
    assert torch.equal(relative_position_index(), swin.features[7][1].attn.relative_position_index)


def test_weight_scale_is_literal_fan_in_times_a_double_reciprocal():
    key, shape = 'face_decoder.output_upscaling.0.weight', (256, 64, 2, 2)  # ConvTranspose: numel/shape[0] = 256
    raw = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
    assert torch.equal(synthetic_tensor(key, shape), raw * (1.0 / math.sqrt(256)))
    assert synthetic_kind('x.norm.weight', (64,), torch.float32) == 'norm_weight'
    assert torch.equal(synthetic_tensor('x.norm.weight', (4,)),
                       torch.randn(4, generator=torch.Generator().manual_seed(zlib.crc32(b'x.norm.weight'))) * 0.1 + 1.0)


def test_positional_encoding_is_exact(decoded, facexformer_ref):
    assert torch.equal(decoded['pe'][:, :8, :8], facexformer_ref['pe_corner'])


def sub(tensor, step):
    return tensor[..., ::step, ::step]


def test_intermediates_match_the_official_forward(decoded, facexformer_dir):
    """The astronaut's stage features and fused states; NAME_subS holds every S-th row and column of NAME."""
    inter = torch.load(facexformer_dir / 'ref_intermediates.pt', weights_only=True)
    ours = {f'stage{i}': stage[1] for i, stage in enumerate(decoded['stages'], start=1)}
    ours['fused_states'] = decoded['fused'][1]
    compared = set()
    for key, expected in inter.items():
        if key == 'meta':
            continue
        name, _, step = key.partition('_sub')
        torch.testing.assert_close(sub(ours[name], int(step or 1)), expected, rtol=1e-4, atol=1e-4, msg=key)
        compared.add(name)
    assert compared == set(ours)


def test_parsing_logits_and_heads_match_the_reference(decoded, facexformer_ref):
    logits = decoded['segmentation']
    expected = facexformer_ref[f'seg_logits_sub{LOGITS_STRIDE}']
    torch.testing.assert_close(sub(logits, LOGITS_STRIDE), expected, rtol=1e-4, atol=1e-5)
    for ours, theirs in HEADS.items():
        torch.testing.assert_close(decoded[ours], facexformer_ref[theirs], rtol=1e-4, atol=1e-5)
    differs = logits.argmax(1) != facexformer_ref['parsing']
    assert not (differs & facexformer_ref['parsing_clear']).any()
    assert differs.sum() <= 5  # near-ties only (169 pixels have a gap <= 1e-4)
    # what upstream derives from the heads
    assert torch.equal((decoded['attribute'].sigmoid() >= 0.5).long(), facexformer_ref['attribute_bits'])
    assert torch.equal(decoded['age'].argmax(1), facexformer_ref['age_class'])


def test_segment_and_the_official_task_filter(model, facexformer_ref):
    with torch.inference_mode():
        logits = model.segment(facexformer_ref['input'][1:])
        landmarks, pose, *_, segmentation = model(facexformer_ref['input'], None, torch.tensor([0, 1]))
    expected = facexformer_ref[f'seg_logits_sub{LOGITS_STRIDE}']
    torch.testing.assert_close(sub(logits, LOGITS_STRIDE), expected[1:], rtol=1e-4, atol=1e-5)
    # the official forward keeps, per output, only the rows whose task selects it
    assert segmentation.shape == (1, 11, 224, 224)
    torch.testing.assert_close(sub(segmentation, LOGITS_STRIDE), expected[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(landmarks, facexformer_ref['landmarks'][1:], rtol=1e-4, atol=1e-5)
    assert pose.shape == (0, 3)


def test_loader_reads_the_official_layout_and_rejects_wrong_files(tmp_path, synthetic, reference_dir):
    small = dict(synthetic)  # a shallow copy: the same tensors, nothing is duplicated
    # Writing a full checkpoint costs 369 MB of disk: the file checks run on small files here, and the full
    # load of a file laid out like ckpts/model.pt runs in the stage-3 tests.
    genforce = reference_dir / 'genforce' / 'tiny_ckpt.pth'
    with pytest.raises(PipelineError, match="no 'state_dict_backbone' entry.*generator"):
        load_facexformer(genforce)
    with pytest.raises(PipelineError, match='no such file'):
        load_facexformer(tmp_path / 'missing.pt')
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'PK\x03\x04 not really a checkpoint')
    with pytest.raises(PipelineError, match='truncated or corrupt'):
        load_facexformer(corrupt)

    wrong = dict(small)
    wrong['linear_fuse.weight'] = torch.zeros(256, 512, 1, 1)
    del wrong['pe_layer.positional_encoding_gaussian_matrix']
    wrong['extra.weight'] = torch.zeros(1)
    with pytest.raises(PipelineError, match=r'1 missing keys \(pe_layer.*1 unexpected keys \(extra.weight\).*'
                                            r'linear_fuse.weight \[256, 512, 1, 1\] vs \[256, 1024, 1, 1\]'):
        facexformer_from_state_dict(wrong, 'wrong.pt')
    damaged = dict(small)
    damaged['linear_fuse.weight'] = torch.full((256, 1024, 1, 1), float('nan'))
    with pytest.raises(PipelineError, match='damaged.pt holds NaN or infinite values'):
        facexformer_from_state_dict(damaged, 'damaged.pt')
    not_tensor = dict(small)
    not_tensor['linear_fuse.weight'] = 3
    with pytest.raises(PipelineError, match='not tensors'):
        facexformer_from_state_dict(not_tensor, 'odd.pt')


def test_loaded_model_holds_the_file_values_in_eval_mode(synthetic):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in synthetic.items()}
    model = facexformer_from_state_dict(half)
    assert not model.training and not model.backbone[0][5][3].training  # stochastic depth off
    fuse = model.linear_fuse.weight
    assert fuse.dtype == torch.float32 and torch.equal(fuse, synthetic['linear_fuse.weight'].half().float())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.backbone[0][1][0].attn.relative_position_index, relative_position_index())
