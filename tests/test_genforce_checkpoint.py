"""Zoo-checkpoint loading (key table of the real zoo model, width inference, bad files) and uint8 conversion."""
import json

import numpy as np
import pytest
import torch

from ohlora.errors import PipelineError
from stylegan.checkpoint import load_discriminator, load_generator, unwrap_zoo_checkpoint
from stylegan.postprocess import to_uint8
from stylegan.stylegan_discriminator import StyleGANDiscriminator
from stylegan.stylegan_generator import StyleGANGenerator


@pytest.fixture(scope='module')
def tiny_checkpoint(tiny_ckpt):
    return torch.load(tiny_ckpt, map_location='cpu', weights_only=True)


def key_table(module) -> list[dict]:
    parameters = {name for name, _ in module.named_parameters()}
    return [{'key': k, 'shape': list(v.shape), 'dtype': str(v.dtype).removeprefix('torch.'),
             'kind': 'parameter' if k in parameters else 'buffer', 'numel': v.numel()}
            for k, v in module.state_dict().items()]


def test_zoo_configuration_has_genforce_keys_shapes_and_kinds(reference_dir):
    table = json.loads((reference_dir / 'genforce' / 'keys_stylegan256.json').read_text())
    with torch.device('meta'):  # 49 M values: only the shapes are needed
        generator = StyleGANGenerator(resolution=256)
        discriminator = StyleGANDiscriminator(resolution=256)
    for model, name in ((generator, 'generator'), (discriminator, 'discriminator')):
        assert model.config == table[name]['ctor_kwargs']
        assert key_table(model) == table[name]['state_dict']
        for module_name, facts in table[name]['module_facts'].items():
            if 'wscale' in facts:  # runtime weight scales, to the last bit of the double
                assert model.get_submodule(module_name).wscale == facts['wscale'], module_name
    assert generator.num_layers == table['generator']['derived']['num_layers']


def write(path, obj):
    torch.save(obj, path)
    return path


def test_loads_the_tiny_zoo_file(tiny_ckpt, tiny_checkpoint):
    generator = load_generator(tiny_ckpt)
    assert not generator.training
    for key, value in tiny_checkpoint['generator'].items():
        assert torch.equal(generator.state_dict()[key], value), key
    smooth = load_generator(tiny_ckpt, key='generator_smooth')
    assert torch.equal(smooth.truncation.w_avg, tiny_checkpoint['generator_smooth']['truncation.w_avg'])
    discriminator = load_discriminator(tiny_ckpt)
    assert not discriminator.training
    assert all(torch.equal(discriminator.state_dict()[k], v) for k, v in tiny_checkpoint['discriminator'].items())


def test_training_snapshot_layout_and_module_prefix(tmp_path, tiny_checkpoint):
    nested = {'models': {name: {f'module.{k}': v for k, v in sd.items()} for name, sd in tiny_checkpoint.items()},
              'running_metadata': {'iter': torch.tensor(7)}}
    generator = load_generator(write(tmp_path / 'snapshot.pth', nested), key='generator_smooth')
    assert torch.equal(generator.truncation.w_avg, tiny_checkpoint['generator_smooth']['truncation.w_avg'])

    mixed = {'generator': {'module.a': torch.zeros(1), 'b': torch.zeros(1)}}
    assert set(unwrap_zoo_checkpoint(mixed)['generator']) == {'module.a', 'b'}  # only stripped when all have it


def test_other_widths_load(tmp_path):
    torch.manual_seed(0)
    generator = StyleGANGenerator(resolution=32, z_space_dim=24, w_space_dim=20, mapping_layers=3,
                                  mapping_fmaps=12, fmaps_base=256, fmaps_max=32)
    generator.truncation.w_avg.normal_()
    discriminator = StyleGANDiscriminator(resolution=32, fmaps_base=256, fmaps_max=32)
    path = write(tmp_path / 'other.pth', {'generator': generator.state_dict(),
                                          'discriminator': discriminator.state_dict(),
                                          'generator_smooth': generator.state_dict()})
    loaded = load_generator(path)
    assert loaded.config == generator.config
    z = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.equal(loaded(z)['image'], generator.eval()(z)['image'])
    assert load_discriminator(path).config == discriminator.config


def test_all_zero_w_avg_is_reported(tmp_path, tiny_checkpoint):
    smooth = dict(tiny_checkpoint['generator_smooth'], **{'truncation.w_avg': torch.zeros(64)})
    path = write(tmp_path / 'zero_w_avg.pth', {**tiny_checkpoint, 'generator_smooth': smooth})
    with pytest.warns(UserWarning, match='w_avg is all zeros'):
        load_generator(path, key='generator_smooth')


def assert_one_line_error(call, match):
    with pytest.raises(PipelineError, match=match) as info:
        call()
    assert '\n' not in str(info.value)


def test_bad_files_give_one_line_errors(tmp_path, tiny_ckpt, tiny_checkpoint):
    assert_one_line_error(lambda: load_generator(tmp_path / 'absent.pth'), 'no such file')

    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(tiny_ckpt.read_bytes()[:100_000])
    assert_one_line_error(lambda: load_generator(truncated), 'truncated or corrupt')

    other_model = write(tmp_path / 'cnn.pth', {'conv1.0.weight': torch.zeros(32, 3, 3, 3)})
    assert_one_line_error(lambda: load_generator(other_model), "no 'generator' entry")
    assert_one_line_error(lambda: load_discriminator(other_model), "no 'discriminator' entry")

    no_smooth = write(tmp_path / 'no_smooth.pth', {'generator': tiny_checkpoint['generator']})
    assert_one_line_error(lambda: load_generator(no_smooth, key='generator_smooth'), "no 'generator_smooth' entry")
    assert_one_line_error(lambda: load_generator(tiny_ckpt, key='discriminator'), 'unknown generator entry')

    swapped = write(tmp_path / 'swapped.pth', {'generator': tiny_checkpoint['discriminator']})
    assert_one_line_error(lambda: load_generator(swapped), 'not a GenForce StyleGANGenerator')


def test_wrong_shapes_give_one_line_errors(tmp_path, tiny_checkpoint):
    generator = dict(tiny_checkpoint['generator'])
    generator['synthesis.layer5.weight'] = torch.zeros(16, 16, 1, 1)
    path = write(tmp_path / 'reshaped.pth', {**tiny_checkpoint, 'generator': generator})
    assert_one_line_error(lambda: load_generator(path), r'does not fit .*synthesis\.layer5\.weight')

    discriminator = dict(tiny_checkpoint['discriminator'])
    del discriminator['layer3.blur.kernel']
    path = write(tmp_path / 'missing.pth', {**tiny_checkpoint, 'discriminator': discriminator})
    assert_one_line_error(lambda: load_discriminator(path), r'1 missing keys \(layer3\.blur\.kernel\)')

    widths = dict(tiny_checkpoint['generator'])
    widths['synthesis.layer9.bias'] = torch.zeros(3)  # 16 channels at 64 but 3 at the next conv
    path = write(tmp_path / 'widths.pth', {**tiny_checkpoint, 'generator': widths})
    assert_one_line_error(lambda: load_generator(path), 'channel widths')


def test_to_uint8_is_genforce_postprocess():
    values = np.array([-2.0, -1.0, -0.9999, 0.0, 1.0, 3.0, np.nextafter(1 / 255, 0), 1 / 255], dtype=np.float32)
    images = np.broadcast_to(values.reshape(1, 1, 1, -1), (2, 3, 1, values.size)).copy()
    images[:, 1] *= -1
    out = to_uint8(torch.from_numpy(images))
    assert out.dtype == np.uint8 and out.shape == (2, 1, values.size, 3)  # NHWC, RGB order kept
    expected = np.floor(np.clip((images.astype(np.float64) + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
    assert np.array_equal(out, expected.transpose(0, 2, 3, 1))
    assert out[0, 0, :6, 0].tolist() == [0, 0, 0, 128, 255, 255]
    assert np.array_equal(to_uint8(images), out)  # numpy input too
