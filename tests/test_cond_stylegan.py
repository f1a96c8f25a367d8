"""Oh-LoRA conditional generators / discriminator: published key tables, tiny reference outputs, loaders, checks."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ohlora.errors import PipelineError
from stylegan.postprocess import to_uint8
from stylegan_modified.checkpoint import (WrongCheckpoint, describe_checkpoint, infer_conditional_discriminator_kwargs,
                                          infer_conditional_generator_kwargs, load_conditional_discriminator,
                                          load_conditional_generator)
from stylegan_modified.stylegan_discriminator import StyleGANDiscriminator, StyleGANDiscriminatorForV4
from stylegan_modified.stylegan_generator import (StyleGANGenerator, StyleGANGeneratorForV2, StyleGANGeneratorForV3,
                                                  StyleGANGeneratorForV4)

TINY = dict(resolution=256, z_space_dim=32, w_space_dim=32, mapping_fmaps=32, fmaps_base=1024, fmaps_max=16)
TINY_D = dict(resolution=256, fmaps_base=1024, fmaps_max=16)
PUBLISHED = {
    'stylegan_gen_fine_tuned_v1.pth': StyleGANGenerator,
    'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth': StyleGANGeneratorForV3,
    'stylegan_gen_fine_tuned_v4.pth': StyleGANGeneratorForV4,
    'stylegan_dis_fine_tuned_v1.pth': StyleGANDiscriminator,
    'stylegan_dis_fine_tuned_v4.pth': StyleGANDiscriminatorForV4,
}


@pytest.fixture(scope='module')
def tiny_files(cond_stylegan_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp('cond_tiny')
    paths = {}
    for name, state_dict in cond_stylegan_tiny['state_dicts'].items():
        paths[name] = folder / f'{name}.pth'
        torch.save(state_dict, paths[name])
    return paths


def key_table(reference_dir, file_name):
    return json.loads((reference_dir / 'ohlora' / 'keys' / f'{file_name}.json').read_text())


def meta_state_dict(table):
    return {row['key']: torch.empty(row['shape'], device='meta') for row in table['keys']}


@pytest.mark.parametrize('file_name', sorted(PUBLISHED))
def test_published_key_tables_match_the_classes_at_full_size(reference_dir, file_name):
    table = key_table(reference_dir, file_name)
    cls = PUBLISHED[file_name]
    with torch.device('meta'):  # 26 M parameters: only names, shapes and scales are needed
        model = cls(resolution=256)
    parameters = {name for name, _ in model.named_parameters()}
    ours = [{'key': k, 'shape': list(v.shape), 'kind': 'parameter' if k in parameters else 'buffer'}
            for k, v in model.state_dict().items()]
    assert ours == [{k: row[k] for k in ('key', 'shape', 'kind')} for row in table['keys']]  # names, order, shapes
    assert sum(v.numel() for v in model.parameters()) == table['summary']['parameter_numel']
    for layer, facts in table['runtime_facts'].items():  # e.g. dense0 sqrt(2)/sqrt(536) * 0.01 for v3
        module = model.get_submodule(layer)
        assert math.isclose(module.wscale, facts['runtime_weight_multiplier'], rel_tol=1e-12), layer
        if 'runtime_bias_multiplier' in facts:
            assert module.bscale == facts['runtime_bias_multiplier']
        assert module.activate == (facts['activation'] == 'LeakyReLU')

    # The widths are read back from the shapes alone, and the strict load accepts the table's tensors.
    state_dict = meta_state_dict(table)
    if cls in (StyleGANDiscriminator, StyleGANDiscriminatorForV4):
        kwargs = infer_conditional_discriminator_kwargs(state_dict)
        assert kwargs['label_size'] == table['label']['size']
        assert model.layer12.mbstd.group_size == 16
    else:
        kwargs = infer_conditional_generator_kwargs(state_dict)
        assert (kwargs['label_size'], kwargs['label_convert_dim']) == (table['label']['size'],
                                                                      table['label']['embedding_dim'])
        assert kwargs['z_space_dim'] == 512 and kwargs['fmaps_base'] == 16384 and kwargs['fmaps_max'] == 512
    with torch.device('meta'):
        rebuilt = cls(**kwargs)
    rebuilt.load_state_dict(state_dict, strict=True, assign=True)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state_dict.items()}


def test_every_key_table_is_named_correctly(reference_dir):
    expected = {'stylegan_gen_fine_tuned_v1.pth': 'generator v1', 'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth':
                'generator v3', 'stylegan_gen_fine_tuned_v4.pth': 'generator v4',
                'stylegan_dis_fine_tuned_v1.pth': 'discriminator v1', 'stylegan_dis_fine_tuned_v4.pth':
                'discriminator v4', 'stylegan_gen_fine_tuned_v2_cnn.pth': 'property cnn',
                'gender_model_0.pt': 'gender cnn', 'quality_model_3.pt': 'quality cnn',
                'NOT_PUBLISHED_stylegan_gen_fine_tuned_v3_ckpt_0005_enc.pth': 'cvae encoder',
                'REFERENCE_genforce_stylegan256_generator': 'genforce generator',
                'REFERENCE_genforce_stylegan256_discriminator': 'genforce discriminator'}
    for file_name, kind in expected.items():
        description, found = describe_checkpoint(meta_state_dict(key_table(reference_dir, file_name)))
        assert found == kind, (file_name, description)
    v1 = meta_state_dict(key_table(reference_dir, 'stylegan_gen_fine_tuned_v1.pth'))
    assert 'v1 (or v2)' in describe_checkpoint(v1)[0] and 'z width' not in describe_checkpoint(v1)[0]


@pytest.mark.parametrize('name,cls,label_key', [('v1_generator', StyleGANGenerator, 'label_v1'),
                                                ('v3_generator', StyleGANGeneratorForV3, 'label_v3')])
def test_tiny_generators_match_the_upstream_outputs(cond_stylegan_tiny, tiny_files, name, cls, label_key):
    generator = load_conditional_generator(tiny_files[name], 'v1' if cls is StyleGANGenerator else 'v3')
    assert type(generator) is cls and not generator.training
    assert generator.config == {**generator.config, **{k: cond_stylegan_tiny['config'][name][k] for k in TINY}}
    reference = cond_stylegan_tiny['outputs'][name]
    z, label = cond_stylegan_tiny['inputs']['z'], cond_stylegan_tiny['inputs'][label_key]
    with torch.no_grad():
        out = generator(z, label, **cond_stylegan_tiny['g_kwargs'])
        assert list(out)[:5] == ['z', 'label', 'w', 'embedding', 'wp'] and list(out)[-1] == 'image'
        for ours, theirs in (('z', 'z_normalized'), ('embedding', 'embedding'), ('w', 'w'), ('wp', 'wp'),
                             ('style00', 'style00'), ('style13', 'style13')):
            torch.testing.assert_close(out[ours], reference[theirs], atol=1e-5, rtol=0)
        torch.testing.assert_close(out['image'][:1], reference['image_sample0'], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(F.avg_pool2d(out['image'], 8), reference['image_avgpool8'], atol=1e-4, rtol=1e-4)
        stats = torch.stack([out['image'].mean(dim=[1, 2, 3]), out['image'].std(dim=[1, 2, 3])], dim=1)
        torch.testing.assert_close(stats, reference['image_mean_std'], atol=1e-4, rtol=1e-4)
        truncated = generator(z, label, **cond_stylegan_tiny['g_kwargs_trunc'])
        torch.testing.assert_close(truncated['wp'], reference['wp_trunc'], atol=1e-5, rtol=0)
        torch.testing.assert_close(F.avg_pool2d(truncated['image'], 8), reference['image_trunc_avgpool8'],
                                   atol=1e-4, rtol=1e-4)
    if 'image_uint8_nhwc_sample0' in reference:
        difference = np.abs(to_uint8(out['image'][:1]).astype(int) - reference['image_uint8_nhwc_sample0'].numpy())
        assert difference.max() <= 1 and np.mean(difference != 0) < 1e-3


def test_label_goes_through_the_pixel_norm_with_z(cond_stylegan_tiny, tiny_files):
    generator = load_conditional_generator(tiny_files['v3_generator'], 'v3')
    z, label = cond_stylegan_tiny['inputs']['z'], cond_stylegan_tiny['inputs']['label_v3']
    with torch.no_grad():
        out = generator.mapping(z, label)
        embedding = label @ generator.mapping.label_weight
        joint = torch.cat([z, embedding], dim=1)
        torch.testing.assert_close(out['z'], joint / torch.sqrt(joint.square().mean(dim=1, keepdim=True) + 1e-8))
        # The label changes w: the embedding is not ignored.
        other = generator.mapping(z, torch.zeros_like(label))['w']
        assert (other - out['w']).abs().max() > 1e-3


def test_float64_labels_and_z_are_cast(cond_stylegan_tiny, tiny_files):
    generator = load_conditional_generator(tiny_files['v3_generator'], 'v3')
    z, label = cond_stylegan_tiny['inputs']['z'], cond_stylegan_tiny['inputs']['label_v3']
    with torch.no_grad():
        single = generator(z, label)
        double = generator(z.double(), label.double())  # as read from a CSV (R12)
    assert double['image'].dtype == torch.float32 and double['label'].dtype == torch.float32
    assert torch.equal(single['w'], double['w'])
    with pytest.raises(ValueError, match='label'):
        generator(z, label[:, :3])
    with pytest.raises((ValueError, TypeError)):
        generator(z, None)


def test_tiny_discriminator_matches_the_upstream_logits(cond_stylegan_tiny, tiny_files):
    discriminator = load_conditional_discriminator(tiny_files['v1_discriminator'], 'v1')
    assert not discriminator.training and discriminator.layer12.mbstd.group_size == 16
    real = cond_stylegan_tiny['inputs']['real_uint8'].float() / 127.5 - 1.0
    generator = load_conditional_generator(tiny_files['v1_generator'], 'v1')
    reference = cond_stylegan_tiny['outputs']['v1_discriminator']
    label = cond_stylegan_tiny['inputs']['label_v1']
    with torch.no_grad():
        fake = generator(cond_stylegan_tiny['inputs']['z'], label)['image']
        torch.testing.assert_close(discriminator(real, label), reference['logits_real'], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(discriminator(real, label.double()), reference['logits_real'], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(discriminator(real, torch.zeros(4, 7)), reference['logits_real_zero_label'],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(discriminator(fake, label), reference['logits_fake_v1'], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='label'):
        discriminator(real, label[:, :3])


def test_v1_mixes_styles_in_train_mode_only(cond_stylegan_tiny):
    torch.manual_seed(0)
    v1 = StyleGANGenerator(**TINY)
    v1.load_state_dict(cond_stylegan_tiny['state_dicts']['v1_generator'])
    v3 = StyleGANGeneratorForV3(**TINY)
    v3.load_state_dict(cond_stylegan_tiny['state_dicts']['v3_generator'])
    v2 = StyleGANGeneratorForV2(**TINY)
    assert v2.mapping.label_weight.shape == (7, 16)
    z, label = cond_stylegan_tiny['inputs']['z'], cond_stylegan_tiny['inputs']['label_v1']
    np.random.seed(0)
    with torch.no_grad():
        v1.train()
        mixed = [v1(z, label)['image'] for _ in range(4)]
        assert any(not torch.equal(mixed[0], other) for other in mixed[1:])  # p = 0.9 each call
        v3.train()
        assert torch.equal(v3(z, label)['image'], v3(z, label)['image'])  # mixing default 0.0
        v1.eval()
        assert torch.equal(v1(z, label)['image'], v1(z, label)['image'])


def test_wrong_files_are_named(tmp_path, tiny_files, reference_dir):
    def fails(path, variant, *expected, loader=load_conditional_generator):
        with pytest.raises(PipelineError) as info:
            loader(path, variant)
        message = str(info.value)
        assert '\n' not in message and str(path) in message
        for text in expected:
            assert text in message, message
        return info.value

    error = fails(tiny_files['v1_generator'], 'v3', 'Oh-LoRA v1 (or v2) generator', 'not the Oh-LoRA v3 generator')
    assert isinstance(error, WrongCheckpoint) and error.found == 'generator v1'
    fails(tiny_files['v3_generator'], 'v1', 'Oh-LoRA v3 generator', 'not the Oh-LoRA v1 generator')
    fails(tiny_files['v1_discriminator'], 'v3', 'Oh-LoRA v1 discriminator')
    fails(tiny_files['v3_generator'], 'v1', 'Oh-LoRA v3 generator', loader=load_conditional_discriminator)
    fails(reference_dir / 'genforce' / 'tiny_ckpt.pth', 'v3', 'GenForce model-zoo checkpoint')
    zoo = torch.load(reference_dir / 'genforce' / 'tiny_ckpt.pth', weights_only=True)
    torch.save(zoo['generator'], tmp_path / 'genforce_g.pth')
    fails(tmp_path / 'genforce_g.pth', 'v3', 'unconditional GenForce StyleGAN generator')
    torch.save(zoo['discriminator'], tmp_path / 'genforce_d.pth')
    fails(tmp_path / 'genforce_d.pth', 'v1', 'GenForce StyleGAN discriminator', loader=load_conditional_discriminator)
    torch.save({'conv1.0.weight': torch.zeros(32, 3, 3, 3), 'fc1.0.weight': torch.zeros(8, 12288)}, tmp_path / 'q.pt')
    fails(tmp_path / 'q.pt', 'v3', 'Oh-LoRA quality CNN')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
    fails(tmp_path / 'tensor.pt', 'v3', 'not a state_dict')
    # The right kind, but damaged: one line naming what does not fit.
    broken = dict(torch.load(tiny_files['v3_generator'], weights_only=True))
    del broken['synthesis.layer5.style.bias']
    torch.save(broken, tmp_path / 'broken.pth')
    fails(tmp_path / 'broken.pth', 'v3', '1 missing keys', 'synthesis.layer5.style.bias')
    (tmp_path / 'truncated.pth').write_bytes(tiny_files['v3_generator'].read_bytes()[:5000])
    fails(tmp_path / 'truncated.pth', 'v3', 'truncated or corrupt')


def test_wrapped_and_prefixed_state_dicts_load(tmp_path, cond_stylegan_tiny):
    state_dict = cond_stylegan_tiny['state_dicts']['v3_generator']
    torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, tmp_path / 'wrapped.pth')
    generator = load_conditional_generator(tmp_path / 'wrapped.pth', 'v3')
    assert torch.equal(generator.mapping.label_weight, state_dict['mapping.label_weight'])


def test_checks_after_loading_warn(tmp_path, cond_stylegan_tiny):
    state_dict = dict(cond_stylegan_tiny['state_dicts']['v3_generator'])
    state_dict['synthesis.lod'] = torch.tensor(1.0)
    state_dict['synthesis.layer2.blur.kernel'] = state_dict['synthesis.layer2.blur.kernel'] * 2
    state_dict['mapping.dense3.bias'] = state_dict['mapping.dense3.bias'].double()
    torch.save(state_dict, tmp_path / 'odd.pth')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        generator = load_conditional_generator(tmp_path / 'odd.pth', 'v3')
    messages = ' | '.join(str(w.message) for w in caught)
    assert 'lod is 1' in messages and 'blur kernel' in messages and 'float64' in messages
    assert generator.mapping.dense3.bias.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the reference files pass every check silently
        torch.save(cond_stylegan_tiny['state_dicts']['v3_generator'], tmp_path / 'clean.pth')
        load_conditional_generator(tmp_path / 'clean.pth', 'v3')
