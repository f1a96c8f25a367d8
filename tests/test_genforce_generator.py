"""GenForce StyleGAN generator against GenForce's own outputs (tests/data/genforce, tolerances in its README).

Everything is driven by tiny_config.json, so the same tests run on another data set made the same way.
Codes (z, w, wp, styles) are compared for the whole batch of 8; float images every IMAGE_STRIDE-th pixel,
uint8 images in full for the first sample (tests/data/README.md).
"""
import json
import math

import numpy as np
import pytest
import torch

from stylegan.checkpoint import infer_generator_kwargs, load_generator
from stylegan.postprocess import to_uint8
from stylegan.stylegan_generator import StyleGANGenerator

# README §4 tolerances
CODE_TOL = dict(rtol=1e-5, atol=1e-5)   # z, w, wp, styles
IMAGE_ATOL = 1e-4                       # float images, max abs
UINT8_MAX_OFF_FRACTION = 0.0005         # uint8: never more than ±1, at most 0.05 % off by one
IMAGE_STRIDE = 5                        # image_{a,b}_sub5 hold every 5th row and column


@pytest.fixture(scope='module')
def smooth(genforce):
    path, _, _ = genforce
    return load_generator(path, key='generator_smooth')


@pytest.fixture(scope='module')
def outputs(genforce, smooth):
    """Calls (a) and (b) of the README on the full reference batch, as GenForce made them."""
    _, config, ref = genforce
    with torch.no_grad():
        return {'a': smooth(ref['z'], **config['call_a']), 'b': smooth(ref['z'], **config['call_b'])}


def lod_tag(lod: float) -> str:
    return f'{lod:g}'.replace('.', 'p')


def assert_uint8_close(actual: np.ndarray, expected: torch.Tensor):
    expected = expected.numpy()
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= UINT8_MAX_OFF_FRACTION


def test_kwargs_inferred_from_shapes_match_the_reference(genforce):
    path, config, _ = genforce
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    expected = {**StyleGANGenerator(resolution=8).config, **config['generator_kwargs']}
    for key in ('generator', 'generator_smooth'):
        inferred = infer_generator_kwargs(checkpoint[key])
        built = StyleGANGenerator(**inferred)
        assert {k: built.config[k] for k in expected} == expected
        state = built.state_dict()
        assert list(state) == list(checkpoint[key])
        assert all(state[k].shape == v.shape for k, v in checkpoint[key].items())


def test_mapping_and_truncation(genforce, outputs):
    _, _, ref = genforce
    a, b = outputs['a'], outputs['b']
    assert list(a)[:4] == ['z', 'label', 'w', 'wp'] and list(a)[-1] == 'image'
    assert a['label'] is None
    torch.testing.assert_close(a['z'], ref['z_normalized'], **CODE_TOL)
    torch.testing.assert_close(a['w'], ref['w'], **CODE_TOL)
    torch.testing.assert_close(a['wp'], ref['wp_a'], **CODE_TOL)
    torch.testing.assert_close(b['wp'], ref['wp_b'], **CODE_TOL)
    assert not torch.allclose(ref['wp_a'], ref['wp_b'])  # the data does tell truncation on and off apart


@pytest.mark.parametrize('call', ['a', 'b'])
def test_styles(genforce, outputs, call):
    _, config, ref = genforce
    names = sorted(n[:-2] for n in config['tensors'] if n.startswith('style') and n.endswith(f'_{call}'))
    assert len(names) == outputs[call]['wp'].shape[1]
    for name in names:
        torch.testing.assert_close(outputs[call][name], ref[f'{name}_{call}'], **CODE_TOL, msg=name)


@pytest.mark.parametrize('call', ['a', 'b'])
def test_float_images(genforce, outputs, call):
    _, _, ref = genforce
    expected = ref[f'image_{call}_sub{IMAGE_STRIDE}']
    actual = outputs[call]['image'][:len(expected), :, ::IMAGE_STRIDE, ::IMAGE_STRIDE]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= IMAGE_ATOL


@pytest.mark.parametrize('call', ['a', 'b'])
def test_uint8_images(genforce, outputs, call):
    _, _, ref = genforce
    expected = ref[f'uint8_{call}']
    assert_uint8_close(to_uint8(outputs[call]['image'][:len(expected)]), expected)


def test_lod_images(genforce, smooth):
    _, config, ref = genforce
    z = ref['z']
    for lod in config['g_lods']:
        step = 2 ** math.floor(lod)
        expected = ref[f'image_a_lod{lod_tag(lod)}_sub{step}']
        with torch.no_grad():
            full = smooth(z[:len(expected)], lod=lod, **config['call_a'])['image']
        assert full.shape[-2:] == (smooth.resolution, smooth.resolution)
        sub = full[:, :, ::step, ::step]
        assert (sub - expected).abs().max().item() <= IMAGE_ATOL, lod
        # every pixel of the low-resolution image is repeated over a step x step block
        torch.testing.assert_close(full, sub.repeat_interleave(step, 2).repeat_interleave(step, 3), rtol=0, atol=0)


def test_default_key_is_generator(genforce):
    path, config, ref = genforce
    generator = load_generator(path)
    with torch.no_grad():
        result = generator(ref['z'], **config['call_a'])
    torch.testing.assert_close(result['w'], ref['generator_w'], **CODE_TOL)
    assert_uint8_close(to_uint8(result['image'][:1]), ref['generator_uint8_a0'])
    assert not torch.allclose(result['w'], ref['w'])


def test_submodules_compose_to_forward(genforce, smooth, outputs):
    _, config, ref = genforce
    call = config['call_b']
    with torch.no_grad():
        w = smooth.mapping(ref['z'])['w']
        wp = smooth.truncation(w, trunc_psi=call['trunc_psi'], trunc_layers=call['trunc_layers'])
        image = smooth.synthesis(wp, randomize_noise=False)['image']
    assert torch.equal(wp, outputs['b']['wp'])
    assert torch.equal(image, outputs['b']['image'])


def test_inference_path_is_bit_identical_to_the_autograd_path(genforce, smooth, outputs):
    _, config, ref = genforce
    with torch.enable_grad():  # eval mode, but autograd on: the out-of-place branch
        result = smooth(ref['z'], **config['call_a'])
    assert result['image'].requires_grad
    assert torch.equal(result['image'].detach(), outputs['a']['image'])


def small_generator(**overrides) -> StyleGANGenerator:
    torch.manual_seed(0)
    kwargs = dict(resolution=16, z_space_dim=16, w_space_dim=16, mapping_layers=2, mapping_fmaps=16,
                  fmaps_base=64, fmaps_max=8)
    generator = StyleGANGenerator(**{**kwargs, **overrides})
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if name.endswith(('bias', 'apply_noise.weight')):
                param.normal_(0, 0.2)  # GenForce starts these at zero, which would hide what the tests look for
    return generator


def test_eval_mode_neither_mixes_nor_updates_w_avg():
    generator = small_generator().eval()
    w_avg = generator.truncation.w_avg.clone()
    with torch.no_grad():
        result = generator(torch.randn(4, 16), style_mixing_prob=1.0, w_moving_decay=0.5)
    assert torch.equal(generator.truncation.w_avg, w_avg)
    assert torch.equal(result['wp'], result['w'][:, None].expand_as(result['wp']))


def test_train_mode_updates_w_avg_and_mixes_styles():
    generator = small_generator().train()
    z = torch.randn(4, 16)
    with torch.no_grad():
        w = generator.mapping(z)['w']
        expected_avg = generator.truncation.w_avg * 0.9 + w.mean(dim=0) * (1 - 0.9)
        np.random.seed(3)
        result = generator(z, style_mixing_prob=1.0, w_moving_decay=0.9)
    torch.testing.assert_close(generator.truncation.w_avg, expected_avg, rtol=0, atol=1e-7)
    assert not generator.truncation.w_avg.requires_grad
    same = (result['wp'] == w[:, None]).all(dim=2).all(dim=0)  # per layer: still this z's w?
    cutoff = int(same.logical_not().nonzero()[0])
    np.random.seed(3)
    np.random.uniform()
    assert cutoff == np.random.randint(1, generator.num_layers)  # GenForce's draw, NumPy global RNG
    assert same[:cutoff].all() and not same[cutoff:].any()

    unmixed = generator(z, style_mixing_prob=0.0, w_moving_decay=1.0)
    assert torch.equal(unmixed['wp'], unmixed['w'][:, None].expand_as(unmixed['wp']))
    unmixed['image'].square().mean().backward()  # training (stage 5) back-propagates through all of it
    last_rgb = f'synthesis.output{generator.synthesis.num_blocks - 1}.'
    used = {n: p for n, p in generator.named_parameters() if '.output' not in n or n.startswith(last_rgb)}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in used.values())


def test_random_noise_is_drawn_from_the_cpu_generator():
    generator = small_generator().eval()
    z = torch.randn(2, 16)
    with torch.no_grad():
        fixed = generator(z)['image']
        torch.manual_seed(5)
        first = generator(z, randomize_noise=True)['image']
        torch.manual_seed(5)
        second = generator(z, randomize_noise=True)['image']
    assert torch.equal(first, second)
    assert not torch.allclose(first, fixed)


def test_other_constructor_variants_run():
    for overrides in (dict(repeat_w=False), dict(const_input=False), dict(fused_scale=True, final_tanh=True),
                      dict(label_size=3)):
        generator = small_generator(**overrides).eval()
        label = torch.randn(2, 3) if overrides.get('label_size') else None
        with torch.no_grad():
            result = generator(torch.randn(2, 16), label=label, trunc_psi=0.5, trunc_layers=2)
        assert result['image'].shape == (2, 3, 16, 16), overrides
        assert torch.isfinite(result['image']).all(), overrides
        inferred = infer_generator_kwargs(generator.state_dict())
        assert inferred == {k: generator.config[k] for k in inferred}, overrides


def test_wrong_inputs_raise():
    generator = small_generator().eval()
    with pytest.raises(ValueError, match='z must have shape'):
        generator(torch.randn(2, 15))
    with pytest.raises(ValueError, match='lod must be in'):
        generator(torch.randn(2, 16), lod=2.5)
    with pytest.raises(ValueError, match='wp must have shape'):
        generator.synthesis(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match='noise_type'):
        StyleGANGenerator(resolution=16, noise_type='channel')
