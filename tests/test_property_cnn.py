"""The v2 property-score CNN and the v3 CVAE encoder: key tables, reference forwards, crops, order, loaders."""
import hashlib
import json
import math
import zlib

import pytest
import torch

from ohlora import atomic
from ohlora.constants import PROPERTY_NAMES
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from stylegan_modified.checkpoint import (WrongCheckpoint, infer_cvae_encoder_kwargs, load_conditional_generator,
                                          load_cvae_encoder, load_property_cnn, published_property_cnn)
from stylegan_modified.cvae_encoder import CVAEEncoder, reparameterize
from stylegan_modified.property_score_cnn import SUB_NETS, PropertyScoreCNN

KEY_TABLES = {'property': 'stylegan_gen_fine_tuned_v2_cnn.pth.json',
              'encoder': 'NOT_PUBLISHED_stylegan_gen_fine_tuned_v3_ckpt_0005_enc.pth.json'}
MODELS = {'property': PropertyScoreCNN, 'encoder': CVAEEncoder}
FINAL_LAYERS = ('fc_final', 'fc2_mu', 'fc2_var')


@pytest.fixture(scope='module')
def cnn_reference(reference_dir):
    return torch.load(reference_dir / 'ohlora' / 'cnn_forward.pt', map_location='cpu', weights_only=True)


def rule_scale(key, shape):
    """The reference weight rule (its README §4): bias 0.05, conv sqrt(2)/sqrt(fan_in), linear and final 1/sqrt(fan_in)."""
    fan_in = math.prod(shape) // shape[0]
    if len(shape) == 1:
        return 0.05
    return (math.sqrt(2) if len(shape) == 4 else 1.0) / math.sqrt(fan_in)


def rule_state_dict(model):
    return {key: torch.randn(tuple(value.shape), generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
            * rule_scale(key, tuple(value.shape)) for key, value in model.state_dict().items()}


@pytest.fixture(scope='module')
def rule_files(cnn_reference, tmp_path_factory):
    """Both nets' rule-built state_dicts, checked against the file's scales and checksums, saved as checkpoints."""
    folder = tmp_path_factory.mktemp('rule_weights')
    paths = {}
    for name, cls in MODELS.items():
        state_dict = rule_state_dict(cls())
        assert {k: rule_scale(k, tuple(v.shape)) for k, v in state_dict.items()} == pytest.approx(
            cnn_reference['scales'][name], rel=1e-12)
        for key, checks in cnn_reference['weight_checksums'][name].items():
            tensor = state_dict[key]
            assert float(tensor.double().sum()) == pytest.approx(checks['sum'], abs=1e-4)
            assert tensor.flatten()[:3].tolist() == pytest.approx(checks['first3'], abs=1e-7)
            digest = hashlib.sha256(tensor.numpy().astype('<f4').tobytes()).hexdigest()
            assert digest == checks['sha256_le_float32']
        paths[name] = folder / f'{name}.pth'
        atomic.torch_save(paths[name], state_dict)
    return paths


def reference_images(cnn_reference):
    return (cnn_reference['inputs']['images_uint8'].float() / 255 - 0.5) / 0.5  # [-1, 1]


@pytest.mark.parametrize('name, params', [('property', 11_516_807), ('encoder', 9_877_600)])
def test_state_dict_matches_the_key_table(reference_dir, name, params):
    table = json.loads((reference_dir / 'ohlora' / 'keys' / KEY_TABLES[name]).read_text())
    model = MODELS[name]()
    assert [(row['key'], row['shape'], row['kind']) for row in table['keys']] == [
        (k, list(v.shape), 'parameter') for k, v in model.state_dict().items()]  # names, order, shapes; no buffers
    assert sum(p.numel() for p in model.parameters()) == params == table['summary']['parameter_numel']
    if name == 'property':
        assert list(model.state_dict())[10:12] == ['eyes_score_cnn.fc_final.weight', 'eyes_score_cnn.fc_final.bias']
        counts = {prefix: sum(k.startswith(prefix + '.') for k in model.state_dict()) for prefix in SUB_NETS}
        assert counts == table['sub_cnn_key_counts']


def test_property_cnn_matches_the_reference_forward(rule_files, cnn_reference):
    model = load_property_cnn(rule_files['property'])
    assert isinstance(model, PropertyScoreCNN) and not model.training
    images = reference_images(cnn_reference)
    with torch.no_grad():
        scores = model(images)
    assert scores.shape == (4, 7) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, cnn_reference['outputs']['property']['output'], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(images), scores)  # eval mode: repeatable
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(images), scores, atol=1e-4)  # dropout is what train mode adds


def test_cvae_encoder_matches_the_reference_forward(rule_files, cnn_reference):
    encoder = load_cvae_encoder(rule_files['encoder'])
    assert (encoder.latent_dim, encoder.label_size) == (512, 7) and not encoder.training
    expected = cnn_reference['outputs']['encoder']
    with torch.no_grad():
        mu, logvar = encoder(reference_images(cnn_reference), cnn_reference['inputs']['encoder_label'])
    torch.testing.assert_close(mu, expected['mu'], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logvar, expected['logvar'], atol=1e-5, rtol=1e-4)


def test_output_columns_are_in_the_standard_order_not_the_storage_order():
    model = PropertyScoreCNN().eval()
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        before = model(images)
        model.mouth_score_cnn.fc_final.bias += 10.0           # stored second, column 3
        model.background_score_cnn.fc_final.bias[1] += 100.0  # stored last, its 2nd output = column 6
        shift = model(images) - before
    expected = torch.zeros(7)
    expected[PROPERTY_NAMES.index('mouth')], expected[PROPERTY_NAMES.index('background_std')] = 10.0, 100.0
    torch.testing.assert_close(shift, expected.expand(2, 7), atol=1e-4, rtol=0)


@pytest.mark.parametrize('rows, changed', [
    ((200, 256), {'hair_color', 'hair_length', 'mouth'}),                     # below the eyes/pose boxes
    ((0, 90), {'hair_color', 'background_mean', 'background_std'}),          # above every face box
    ((144, 160), {'hair_color', 'hair_length', 'pose'}),                     # below the eyes, above the mouth
])
def test_each_score_reads_only_its_own_region(rows, changed):
    model = PropertyScoreCNN().eval()
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    edited = images.clone()
    edited[:, :, rows[0]:rows[1], :] = -images[:, :, rows[0]:rows[1], :]
    with torch.no_grad():
        moved = (model(edited) != model(images))[0].tolist()
    assert {name for name, m in zip(PROPERTY_NAMES, moved) if m} == changed


def test_crops_and_flatten_widths_follow_the_spec():
    model = PropertyScoreCNN()
    x = torch.arange(256 * 256, dtype=torch.float32).reshape(1, 1, 256, 256).expand(1, 3, 256, 256)
    boxes = {'eyes_score_cnn': (96, 144, 64, 192), 'mouth_score_cnn': (160, 208, 96, 160),
             'pose_score_cnn': (112, 160, 88, 168), 'hair_color_score_cnn': (0, 256, 0, 256),
             'hair_length_score_cnn': (128, 256, 0, 256), 'background_score_cnn': (0, 128, 0, 256)}
    for prefix, (top, bottom, left, right) in boxes.items():
        sub = getattr(model, prefix)
        assert torch.equal(sub.crop(x), x[:, :, top:bottom, left:right])
        assert sub.fc1[0].in_features == SUB_NETS[prefix].flat


def test_forward_rejects_other_inputs():
    model, encoder = PropertyScoreCNN(), CVAEEncoder(latent_dim=8, hidden_dim=16)
    with pytest.raises(ValueError, match=r'\(N, 3, 256, 256\) images'):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3, 256, 256), training=False)  # no **kwargs catch-all
    with pytest.raises(ValueError, match=r'\(1, 7\) labels'):
        encoder(torch.zeros(1, 3, 256, 256), torch.zeros(1, 3))
    with pytest.raises(TypeError):
        encoder(torch.zeros(1, 3, 256, 256), torch.zeros(1, 7), labels=None)


def test_encoder_follows_the_generator_width_and_reads_the_label_twice(tmp_path):
    torch.manual_seed(3)
    encoder = CVAEEncoder(latent_dim=32, hidden_dim=64).eval()
    assert encoder.fc1[0].weight.shape == (64, 16384 + 7) and encoder.fc2_mu.weight.shape == (32, 64 + 7)
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    label = torch.randn(2, 7)
    with torch.no_grad():
        mu, logvar = encoder(images, label)
        assert mu.shape == logvar.shape == (2, 32)
        encoder.fc1[0].weight[:, 16384:] = 0  # cut the first label path: the second one still moves mu
        mu_a, _ = encoder(images, label)
        mu_b, _ = encoder(images, label + 1)
    assert not torch.allclose(mu_a, mu_b)
    path = tmp_path / 'enc.pth'
    atomic.torch_save(path, encoder.state_dict())
    assert infer_cvae_encoder_kwargs(encoder.state_dict()) == {'latent_dim': 32, 'label_size': 7, 'hidden_dim': 64}
    loaded = load_cvae_encoder(path)
    with torch.no_grad():
        assert torch.equal(loaded(images, label)[0], mu_a)


def test_encoder_for_a_tiny_generator(reference_dir, tmp_path):
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v3_generator'], tmp_path / 'v3.pth')
    generator = load_conditional_generator(tmp_path / 'v3.pth', 'v3')
    encoder = CVAEEncoder.for_generator(generator).eval()
    assert (encoder.latent_dim, encoder.label_size) == (32, 7) and encoder.fc2_var.out_features == 32
    with torch.no_grad():
        mu, logvar = encoder(torch.zeros(1, 3, 256, 256), tiny['inputs']['label_v3'][:1])
        z = reparameterize(mu, logvar, torch.zeros_like(mu))
        assert generator(z, tiny['inputs']['label_v3'][:1])['image'].shape == (1, 3, 256, 256)


def test_reparameterize():
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    noise = torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(reparameterize(mu, logvar, noise), torch.tensor([[1.5, -1.0]]))


def test_wrong_files_are_named_in_one_line(tmp_path, rule_files, reference_dir):
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    v1 = tmp_path / 'stylegan_gen_fine_tuned_v1.pth'
    torch.save(tiny['state_dicts']['v1_generator'], v1)

    def fails(loader, path, *expected):
        with pytest.raises(PipelineError) as info:
            loader(path)
        message = str(info.value)
        assert '\n' not in message and str(path) in message, message
        for text in expected:
            assert text in message, message
        return info.value

    error = fails(load_property_cnn, v1, 'is an Oh-LoRA v1 (or v2) generator',
                  'not the Oh-LoRA v2 property-score CNN (stylegan_gen_fine_tuned_v2_cnn.pth)')
    assert isinstance(error, WrongCheckpoint) and error.found == 'generator v1'
    fails(load_cvae_encoder, v1, 'Oh-LoRA v1 (or v2) generator', 'not the Oh-LoRA v3 CVAE encoder')
    fails(load_property_cnn, rule_files['encoder'], 'is the Oh-LoRA v3 CVAE encoder', 'property-score CNN')
    fails(load_cvae_encoder, rule_files['property'], 'is the Oh-LoRA v2 property-score CNN', 'not the Oh-LoRA v3 CVAE')
    gender = tmp_path / 'gender_model_0.pt'
    torch.save({'conv1.0.weight': torch.zeros(32, 3, 3, 3), 'fc1.0.weight': torch.zeros(512, 9216)}, gender)
    fails(load_property_cnn, gender, 'is an Oh-LoRA gender CNN')
    fails(load_property_cnn, reference_dir / 'genforce' / 'tiny_ckpt.pth', 'GenForce model-zoo checkpoint')
    fails(load_property_cnn, tmp_path / 'missing.pth', 'no such file')
    (tmp_path / 'truncated.pth').write_bytes(rule_files['property'].read_bytes()[:5000])
    fails(load_property_cnn, tmp_path / 'truncated.pth', 'truncated or corrupt')

    # the right kind, but damaged
    state_dict = dict(torch.load(rule_files['property'], weights_only=True))
    del state_dict['pose_score_cnn.conv5.0.bias']
    torch.save(state_dict, tmp_path / 'short.pth')
    fails(load_property_cnn, tmp_path / 'short.pth', '1 missing keys', 'pose_score_cnn.conv5.0.bias')
    state_dict = dict(torch.load(rule_files['encoder'], weights_only=True))
    state_dict['fc2_var.bias'] = state_dict['fc2_var.bias'].clone()
    state_dict['fc2_var.bias'][3] = float('inf')
    torch.save(state_dict, tmp_path / 'inf.pth')
    fails(load_cvae_encoder, tmp_path / 'inf.pth', 'NaN or infinite values (fc2_var.bias)')
    state_dict = dict(torch.load(rule_files['property'], weights_only=True))
    state_dict['eyes_score_cnn.fc1.0.weight'] = state_dict['eyes_score_cnn.fc1.0.weight'] * float('nan')
    torch.save(state_dict, tmp_path / 'nan.pth')
    fails(load_property_cnn, tmp_path / 'nan.pth', 'NaN or infinite values (eyes_score_cnn.fc1.0.weight)')
    encoder = CVAEEncoder(latent_dim=8, hidden_dim=16).state_dict()
    encoder['fc2_mu.weight'] = torch.zeros(8, 30)
    torch.save(encoder, tmp_path / 'odd_encoder.pth')
    fails(load_cvae_encoder, tmp_path / 'odd_encoder.pth', 'not a CVAEEncoder state_dict', 'fc2_mu.weight [8, 30]')


def test_published_property_cnn_goes_through_fetch(tmp_path, rule_files):
    layout = Layout(tmp_path / 'root')
    with pytest.raises(PipelineError, match='OHLORA_NO_DOWNLOAD'):  # no cached copy, no download in tests
        published_property_cnn(layout)
    with pytest.raises(PipelineError, match='no such file'):
        published_property_cnn(layout, override=tmp_path / 'nowhere.pth')
    assert isinstance(published_property_cnn(layout, override=rule_files['property']), PropertyScoreCNN)
    cached = layout.fine_tuned('stylegan_gen_fine_tuned_v2_cnn.pth')
    cached.parent.mkdir(parents=True)
    cached.write_bytes(rule_files['property'].read_bytes())
    model = published_property_cnn(layout)
    assert not model.training


def test_other_float_dtypes_load_with_a_warning(tmp_path):
    torch.manual_seed(4)
    encoder = CVAEEncoder(latent_dim=8, hidden_dim=16)
    path = tmp_path / 'double.pth'
    torch.save({k: v.double() for k, v in encoder.state_dict().items()}, path)
    with pytest.warns(UserWarning, match='dtype float64'):
        loaded = load_cvae_encoder(path)
    assert loaded.fc2_mu.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.fc2_mu.weight, encoder.fc2_mu.weight)
