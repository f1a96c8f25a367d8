"""GenForce StyleGAN discriminator against GenForce's own logits (tests/data/genforce, README tolerances)."""
import pytest
import torch

from stylegan.checkpoint import infer_discriminator_kwargs, load_discriminator, load_generator
from stylegan.postprocess import to_uint8
from stylegan.stylegan_discriminator import MiniBatchSTDLayer, StyleGANDiscriminator

LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)  # README §4: some logits are close to 0, so not purely relative


@pytest.fixture(scope='module')
def discriminator(genforce):
    return load_discriminator(genforce[0])


@pytest.fixture(scope='module')
def generated(genforce):
    """Call (a) of the README on the reference batch of 8, from generator_smooth, as GenForce made its inputs."""
    path, config, ref = genforce
    with torch.no_grad():
        return load_generator(path, key='generator_smooth')(ref['z'], **config['call_a'])['image']


@pytest.fixture(scope='module')
def uint8_input(genforce, generated):
    """README: GenForce's uint8 batch (a) made contiguous NCHW, as float32, / 127.5 - 1.

    tests/data keeps only the first uint8 sample, so the batch of 8 is converted again here; the generator
    tests compare that sample with GenForce's (±1 on at most 0.05 % of the values would move these logits by
    about 1e-6; on this data the batch is bit-identical)."""
    images = torch.from_numpy(to_uint8(generated))
    return images.permute(0, 3, 1, 2).contiguous().to(torch.float32) / 127.5 - 1.0


def lod_tag(lod: float) -> str:
    return f'{lod:g}'.replace('.', 'p')


def test_kwargs_inferred_from_shapes_match_the_reference(genforce, discriminator):
    path, config, _ = genforce
    state = torch.load(path, map_location='cpu', weights_only=True)['discriminator']
    expected = {**StyleGANDiscriminator(resolution=8).config, **config['discriminator_kwargs']}
    assert {k: discriminator.config[k] for k in expected} == expected
    assert StyleGANDiscriminator(**infer_discriminator_kwargs(state)).config == discriminator.config
    assert list(discriminator.state_dict()) == list(state)
    assert not discriminator.training


def test_logits_on_generated_images(genforce, discriminator, generated):
    _, _, ref = genforce
    with torch.no_grad():
        batch8 = discriminator(generated)
        batch4 = discriminator(generated[:4])  # GenForce's image_a: samples 0-3, which match within 1e-4
    torch.testing.assert_close(batch8, ref['d_logits_a_b8'], **LOGIT_TOL)
    torch.testing.assert_close(batch4, ref['d_logits_a_b4'], **LOGIT_TOL)
    # the minibatch-std groups depend on the batch: the same four images score differently
    assert (batch8[:4] - batch4).abs().max() > 1e-3


def test_logits_on_uint8_images_and_lods(genforce, discriminator, uint8_input):
    _, config, ref = genforce
    with torch.no_grad():
        torch.testing.assert_close(discriminator(uint8_input), ref['d_logits_u8a_b8'], **LOGIT_TOL)
        for lod in config['d_lods']:
            logits = discriminator(uint8_input, lod=lod)
            torch.testing.assert_close(logits, ref[f'd_logits_u8a_b8_lod{lod_tag(lod)}'], **LOGIT_TOL, msg=str(lod))


def test_minibatch_std_groups_are_strided():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 3, 3)
    out = MiniBatchSTDLayer(group_size=4)(x)
    assert out.shape == (8, 7, 3, 3)
    for i in range(8):
        members = x[[j for j in range(8) if j % 2 == i % 2]]  # with N=8, G=4: {0,2,4,6} and {1,3,5,7}
        expected = torch.sqrt(members.var(dim=0, unbiased=False) + 1e-8).mean()
        torch.testing.assert_close(out[i, 6], expected.expand(3, 3), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[:, :6], x, rtol=0, atol=0)


def test_wrong_inputs_raise(discriminator):
    with pytest.raises(ValueError, match='image must have shape'):
        discriminator(torch.zeros(4, 3, 128, 128))
    with pytest.raises(ValueError, match='multiple of the minibatch-std group size'):
        discriminator(torch.zeros(6, 3, 256, 256))
    with pytest.raises(ValueError, match='lod must be in'):
        discriminator(torch.zeros(4, 3, 256, 256), lod=7)


def test_other_widths_and_a_label():
    torch.manual_seed(0)
    model = StyleGANDiscriminator(resolution=32, label_size=3, fused_scale=False, minibatch_std_channels=2,
                                  fmaps_base=128, fmaps_max=16).eval()
    inferred = infer_discriminator_kwargs(model.state_dict())
    assert inferred == {k: model.config[k] for k in inferred}
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32), label=torch.eye(3)[[0, 1, 2, 0]])
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


def test_the_blur_gradients_are_the_depthwise_convs_to_second_order():
    """The blur's own autograd function (fast R1 double backward) gives the gradients of the plain depthwise conv."""
    import torch.nn.functional as F

    from stylegan.genforce_layers import BlurLayer

    torch.manual_seed(0)
    layer = BlurLayer(3).double()
    layer.kernel.copy_(torch.rand(3, 1, 3, 3, dtype=torch.float64))  # not symmetric: the flip must be right
    assert torch.autograd.gradcheck(layer, (torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True),))
    assert torch.autograd.gradgradcheck(layer, (torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True),))

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    grads = []
    for blur in (layer, lambda t: F.conv2d(t, layer.kernel, padding=1, groups=3)):
        (first,) = torch.autograd.grad((blur(x) ** 2 * weight).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(first.square().sum(), x)  # what R1's backward differentiates
        grads.append((first.detach(), second))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12) and torch.allclose(grads[0][1], grads[1][1], atol=1e-12)
    with torch.no_grad():
        assert torch.equal(layer(x), F.conv2d(x, layer.kernel, padding=1, groups=3))  # forward unchanged


def test_the_lod_buffer_is_read_from_its_device_once_per_value(genforce, uint8_input, monkeypatch):
    """A forward must not call .item() on the lod (a GPU sync per forward): the value is read once and again only
    after the buffer changed (in place, by load_state_dict, or a new tensor); the outputs are those of an explicit
    lod, bit for bit. The same for the generator's synthesis lod, read by the synthesis and by style mixing."""
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: (reads.append(self.shape), item(self))[1])
    discriminator = load_discriminator(genforce[0])
    images = uint8_input[:4]
    with torch.no_grad():
        first = discriminator(images)
        assert len(reads) == 1
        second = discriminator(images)
        assert len(reads) == 1 and torch.equal(first, second)
        reads.clear()
        assert torch.equal(first, discriminator(images, lod=0.0)) and reads == []
        discriminator.load_state_dict({**discriminator.state_dict(), 'lod': torch.tensor(1.0)})
        assert torch.equal(discriminator(images), discriminator(images, lod=1.0)) and len(reads) == 1
        discriminator.lod.fill_(0.5)
        assert torch.equal(discriminator(images), discriminator(images, lod=0.5)) and len(reads) == 2

    generator = load_generator(genforce[0]).train()  # train mode: style mixing reads the synthesis lod too
    z = torch.randn(2, generator.z_space_dim, generator=torch.Generator().manual_seed(0))
    reads.clear()
    with torch.no_grad():
        for _ in range(3):
            generator(z, style_mixing_prob=1.0, w_moving_decay=None)
    assert len(reads) == 1
    generator.synthesis.lod.fill_(1.0)
    with torch.no_grad():
        generator.eval()
        assert torch.equal(generator(z)['image'], generator(z, lod=1.0)['image']) and len(reads) == 2
