"""Stage 2 models: the published key layout, the reference forwards, strict loading and the labels rules."""
import hashlib
import json
import zlib

import numpy as np
import pytest
import torch

from cnn.ensemble import final_scores, load_model, published_weights
from cnn.labels import applicable_labels, read_labels
from cnn.models import MODEL_CLASSES, top_centre_crop
from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.layout import Layout


@pytest.fixture(scope='module')
def cnn_reference(reference_dir):
    return torch.load(reference_dir / 'ohlora' / 'cnn_forward.pt', map_location='cpu', weights_only=True)


def rule_state_dict(prop, reference):
    """The reference file's weight rule: randn seeded by crc32(key), times the stored per-key scale."""
    return {key: torch.randn(tuple(value.shape), generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
            * reference['scales'][prop][key] for key, value in MODEL_CLASSES[prop]().state_dict().items()}


@pytest.mark.parametrize('prop, params', [('gender', 5_845_697), ('quality', 6_828_481)])
def test_state_dict_matches_published_key_table(reference_dir, prop, params):
    table = json.loads((reference_dir / 'ohlora' / 'keys' / f'{prop}_model_0.pt.json').read_text())
    model = MODEL_CLASSES[prop]()
    assert [(k['key'], k['shape']) for k in table['keys']] == [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert sum(p.numel() for p in model.parameters()) == params == table['summary']['parameter_numel']


@pytest.mark.parametrize('prop', ['gender', 'quality'])
def test_reference_forward_through_the_loader(tmp_path, cnn_reference, prop):
    state_dict = rule_state_dict(prop, cnn_reference)
    for key, checks in cnn_reference['weight_checksums'][prop].items():  # the rule is rebuilt correctly
        tensor = state_dict[key]
        assert float(tensor.double().sum()) == pytest.approx(checks['sum'], abs=1e-4)
        assert tensor.flatten()[:3].tolist() == pytest.approx(checks['first3'], abs=1e-7)
        digest = hashlib.sha256(tensor.numpy().astype('<f4').tobytes()).hexdigest()
        assert digest.startswith(checks['sha256_le_float32'][:16])
    path = tmp_path / f'{prop}_model_0.pt'
    atomic.torch_save(path, state_dict)
    model = load_model(prop, path)
    assert not model.training  # eval mode: dropout off
    images = cnn_reference['inputs']['images_uint8'].float() / 255
    with torch.no_grad():
        output = model(images)
    expected = cnn_reference['outputs'][prop]['output']
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
    # Dropout is what upstream left on when scoring loaded models: train mode changes the output.
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(model(images), expected, atol=1e-4)


def test_quality_model_sees_only_the_top_centre_strip():
    x = torch.arange(2 * 3 * 256 * 256, dtype=torch.float32).reshape(2, 3, 256, 256)
    assert torch.equal(top_centre_crop(x), x[:, :, 0:64, 64:192])
    model = MODEL_CLASSES['quality']().eval()
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    outside = images.clone()
    outside[:, :, 64:, :] = 0.3      # everything below the strip
    outside[:, :, :64, :64] = 0.7    # left of it
    inside = images.clone()
    inside[:, :, 10, 100] = 0.0      # one pixel in it
    with torch.no_grad():
        assert torch.equal(model(images), model(outside))
        assert not torch.equal(model(images), model(inside))


def test_wrong_or_corrupt_checkpoints_give_one_line(tmp_path):
    quality = tmp_path / 'quality.pt'
    atomic.torch_save(quality, MODEL_CLASSES['quality']().state_dict())
    with pytest.raises(PipelineError, match=r'does not fit the gender CNN state_dict of fold 2: .*fc1\.0\.weight') as err:
        load_model('gender', quality, fold=2)
    assert '\n' not in str(err.value)
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(quality.read_bytes()[:5000])
    with pytest.raises(PipelineError, match='not a readable PyTorch checkpoint'):
        load_model('quality', corrupt)
    half = tmp_path / 'half.pt'
    atomic.torch_save(half, {k: v.half() for k, v in MODEL_CLASSES['quality']().state_dict().items()})
    with pytest.raises(PipelineError, match='non-float32'):
        load_model('quality', half)
    broken = MODEL_CLASSES['quality']().state_dict()
    broken['conv3.0.bias'][5] = float('nan')
    atomic.torch_save(half, broken)
    with pytest.raises(PipelineError, match=r'NaN or infinite values \(conv3\.0\.bias\)'):
        load_model('quality', half)


def test_weights_folder_override_names_the_missing_file(tmp_path):
    layout = Layout(tmp_path / 'root')
    folder = tmp_path / 'weights'
    folder.mkdir()
    with pytest.raises(PipelineError, match=r'--weights .*weights has no gender_model_0\.pt, gender_model_1\.pt'):
        published_weights('gender', layout, folder)
    with pytest.raises(PipelineError, match='OHLORA_NO_DOWNLOAD'):  # no folder, no cache: no download in tests
        published_weights('quality', layout)
    for fold in range(5):
        (folder / f'quality_model_{fold}.pt').write_bytes(b'x')
    assert [p.name for p in published_weights('quality', layout, folder)] == [f'quality_model_{k}.pt' for k in range(5)]


def test_final_score_is_mean_of_unrounded_outputs():
    outputs = np.array([[0.12344, 0.12344, 0.12344, 0.12344, 0.12346]], dtype=np.float32)
    assert final_scores(outputs)[0] == pytest.approx(0.1234)
    assert final_scores(np.full((1, 5), 0.5, np.float32))[0] == 0.5


def write_labels(path, text):
    path.write_text(text)
    return path


def test_labels_are_validated(tmp_path):
    good = read_labels(write_labels(tmp_path / 'a.csv', 'img_name,quality,gender\n4,1,1\n0,1,0\n3,0,1\n'), 'test')
    assert good.img_nos.tolist() == [0, 3, 4]
    assert good.of('gender').dtype == np.float32 and good.of('gender').tolist() == [0.0, 1.0, 1.0]
    cases = {
        'img_name,quality\n0,1\n': 'lacks the column',
        'img_name,quality,gender\n0,1,2\n': r'gender must hold 0 or 1, found 2',
        'img_name,quality,gender\n0,0.5,1\n': 'quality must hold 0 or 1',
        'img_name,quality,gender\n0,1,1\n0,0,1\n': 'more than once',
        'img_name,quality,gender\n0,1,\n': 'empty or NaN',
        'img_name,quality,gender\n-1,1,1\n': 'whole numbers',
        'img_name,quality,gender\nx,1,1\n': 'image numbers',
        'quality,gender\n1,1\n': 'img_name',
    }
    for text, message in cases.items():
        with pytest.raises(PipelineError, match=message):
            read_labels(write_labels(tmp_path / 'bad.csv', text), 'test')


def test_hand_labels_apply_only_to_the_published_images(tmp_path):
    layout = Layout(tmp_path)
    assert applicable_labels(layout, None, set(range(2000))) is None  # no stage-1 metadata: nothing applies
    atomic.write_json(layout.synthesized_meta, {'source': 'sampled', 'recipe': {'seed': 0}})
    assert applicable_labels(layout, None, set(range(10_000))) is None
    atomic.write_json(layout.synthesized_meta, {'source': 'published'})
    labels = applicable_labels(layout, None, set(range(10_000)))
    assert labels.img_nos.tolist() == list(range(2000)) and labels.origin.endswith('quality_and_gender.csv')
    assert int(labels.of('quality').sum()) == 1905 and int(labels.of('gender').sum()) == 1112
    assert int(((labels.of('quality') == 1) & (labels.of('gender') == 1)).sum()) == 1041
    with pytest.raises(PipelineError, match=r'not in .*first: 000010.jpg.*incomplete'):
        applicable_labels(layout, None, set(range(10)))
    own = write_labels(tmp_path / 'own.csv', 'img_name,quality,gender\n2,1,1\n7,0,0\n')
    assert applicable_labels(layout, own, {2, 7, 9}).img_nos.tolist() == [2, 7]
    with pytest.raises(PipelineError, match='first: 000007.jpg'):
        applicable_labels(layout, own, {2, 3})
