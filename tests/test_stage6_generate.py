"""Stage 6: run_fine_tuned_generator.py with tiny v3/v1-shaped checkpoints (the real topology, tiny widths)."""
import hashlib
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ohlora.constants import PROPERTY_NAMES
from ohlora.layout import Layout
from script_runner import files_of, run_script
from stylegan.postprocess import to_uint8
from stylegan_modified.checkpoint import load_conditional_generator
from stylegan_modified.generation import read_z_csv, varied_latent
from stylegan_modified.labels import PUBLISHED_SCORE_RANGES, UPSTREAM_LABEL, label_vector

SCRIPT = 'run_fine_tuned_generator.py'
Z_DIM = 32  # the tiny checkpoints' z width


@pytest.fixture(scope='module')
def tiny_inputs(cond_stylegan_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stage6_inputs')
    for name in ('v1_generator', 'v3_generator'):
        torch.save(cond_stylegan_tiny['state_dicts'][name], folder / f'{name}.pth')
    z = np.random.default_rng(5).standard_normal(Z_DIM)  # float64, as a CSV holds it
    pd.DataFrame([z], columns=[str(k) for k in range(Z_DIM)]).to_csv(folder / 'z.csv', index=False)
    return {'v3': folder / 'v3_generator.pth', 'v1': folder / 'v1_generator.pth', 'z_csv': folder / 'z.csv',
            'z': z, 'folder': folder}


def base_args(inputs, root, *extra):
    return ['--weights', inputs['v3'], '--z-csv', inputs['z_csv'], '--root', root, '--device', 'cpu',
            '--no-progress', *extra]


def decoded(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR).astype(int)


def close_to(path, rgb):
    """The JPEG at ``path`` is ``rgb`` up to JPEG error (encode the expected pixels the same way)."""
    ok, jpeg = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]))
    difference = np.abs(decoded(path) - cv2.imdecode(jpeg, cv2.IMREAD_COLOR).astype(int))
    return difference.max() <= 8 and difference.mean() < 0.02


def test_default_run_reproduces_the_upstream_recipe_byte_identically(tmp_path, tiny_inputs):
    first, second = tmp_path / 'a', tmp_path / 'b'
    assert run_script(SCRIPT, *base_args(tiny_inputs, first)) == 0
    assert run_script(SCRIPT, *base_args(tiny_inputs, second)) == 0
    folder = Layout(first).final_inference_dir('v3')
    assert files_of(folder) == files_of(Layout(second).final_inference_dir('v3'))  # same seed, same bytes
    images = sorted(p.name for p in folder.glob('*.jpg'))
    assert images == [f'{n:06d}.jpg' for n in range(20)]

    # Image 0 is G(CSV z, upstream label); images 1.. add 0.3 * N(0, I) drawn per image from the seed.
    generator = load_conditional_generator(tiny_inputs['v3'], 'v3')
    record = pd.read_csv(folder / 'z_vectors.csv')
    assert record['img_no'].tolist() == list(range(20))
    z = torch.tensor(record.iloc[:, 1:].to_numpy(np.float32))
    assert torch.equal(z[0], torch.tensor(tiny_inputs['z'], dtype=torch.float32))
    noise = (z[1:].double() - torch.tensor(tiny_inputs['z'])) / 0.3
    assert abs(noise.std().item() - 1) < 0.1 and abs(noise.mean().item()) < 0.1
    assert torch.equal(z[5], varied_latent(tiny_inputs['z'], 0, 5, 0.3))
    label = torch.tensor(label_vector(UPSTREAM_LABEL)).repeat(20, 1)
    assert label[0].tolist() == pytest.approx([1.8, 0, 0, 1.6, -1.2, 0, 0])
    with torch.no_grad():
        expected = to_uint8(generator(z, label, trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image'])
    assert all(close_to(folder / f'{n:06d}.jpg', expected[n]) for n in range(20))
    assert np.abs(expected[0].astype(int) - expected[1]).mean() > 1  # the variation does change the image

    record = json.loads((folder / 'generation_settings.json').read_text())
    settings = record['settings']
    assert settings['model'] == 'v3' and settings['seed'] == 0 and settings['variation'] == 0.3
    assert settings['label'] == UPSTREAM_LABEL and record['weights_file'] == 'v3_generator.pth'
    assert settings['weights_sha256'] == hashlib.sha256(tiny_inputs['v3'].read_bytes()).hexdigest()
    assert str(tmp_path) not in (folder / 'generation_settings.json').read_text()  # no absolute paths (R4)


def test_sweep_writes_images_and_a_labelled_grid_byte_identically(tmp_path, tiny_inputs):
    args = ['--sweep', 'eyes', '--values=-2,0,1.8', '--num', 3, '--batch-size', 2]
    roots = [tmp_path / 'a', tmp_path / 'b']
    for root in roots:
        assert run_script(SCRIPT, *base_args(tiny_inputs, root), *args) == 0
    folder = Layout(roots[0]).final_inference_dir('v3') / 'sweep_eyes'
    assert files_of(folder) == files_of(Layout(roots[1]).final_inference_dir('v3') / 'sweep_eyes')
    names = sorted(p.name for p in folder.glob('*.jpg'))
    assert names == sorted(f'{n:06d}_eyes_{v}.jpg' for n in range(3) for v in ('-2.0', '0.0', '1.8'))
    grid = cv2.imread(str(folder / 'sweep_eyes.png'))
    assert grid.shape == (28 + 26 + 3 * 260, 96 + 3 * 260, 3)
    # cell (row 1, column 2) is image 1 with eyes 1.8; the header rows and the label column hold dark text
    cell = grid[54 + 260:54 + 260 + 256, 96 + 2 * 260:96 + 2 * 260 + 256].astype(int)
    assert np.array_equal(cell, decoded(folder / '000001_eyes_1.8.jpg'))
    assert (grid[:54] < 128).any() and (grid[54:, :96] < 128).any()

    # The sweep value 1.8 is the default eyes value, so that column repeats the plain images up to rounding.
    assert run_script(SCRIPT, *base_args(tiny_inputs, roots[0]), '--num', 3) == 0
    plain = Layout(roots[0]).final_inference_dir('v3')
    for n in range(3):
        a, b = decoded(plain / f'{n:06d}.jpg'), decoded(folder / f'{n:06d}_eyes_1.8.jpg')
        assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 0.05
    eyes = [decoded(folder / f'000000_eyes_{v}.jpg') for v in ('-2.0', '0.0', '1.8')]
    assert np.abs(eyes[0] - eyes[2]).mean() > 1  # the attribute changes the image


def test_rerun_skips_finished_images_and_refuses_other_settings(tmp_path, tiny_inputs, capsys):
    root = tmp_path / 'run'
    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 3)) == 0
    folder = Layout(root).final_inference_dir('v3')
    before = {p: p.stat().st_mtime_ns for p in folder.rglob('*')}
    capsys.readouterr()
    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 3)) == 0
    assert 'wrote 0 images (3 already there)' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob('*')} == before  # nothing rewritten

    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 5, '--batch-size', 1)) == 0
    assert sorted(p.name for p in folder.glob('*.jpg')) == [f'{n:06d}.jpg' for n in range(5)]
    assert pd.read_csv(folder / 'z_vectors.csv')['img_no'].tolist() == list(range(5))
    fresh = tmp_path / 'fresh'
    assert run_script(SCRIPT, *base_args(tiny_inputs, fresh, '--num', 5)) == 0
    for n in range(5):  # a resumed run gives the images of an uninterrupted one (up to batch rounding)
        a, b = decoded(folder / f'{n:06d}.jpg'), decoded(Layout(fresh).final_inference_dir('v3') / f'{n:06d}.jpg')
        assert np.abs(a - b).max() <= 8

    before = files_of(folder)
    for change in (['--eyes', '0.5'], ['--seed', '1'], ['--variation', '0.2'], ['--weights', tiny_inputs['v1'],
                                                                                 '--outdir', folder, '--model', 'v1']):
        capsys.readouterr()
        assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 5), *change) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and 'other settings' in err, err
        assert files_of(folder) == before


def test_seed_changes_only_the_varied_images(tmp_path, tiny_inputs):
    roots = {seed: tmp_path / f's{seed}' for seed in (0, 1)}
    for seed, root in roots.items():
        assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 3, '--seed', seed)) == 0
    a, b = (files_of(Layout(root).final_inference_dir('v3')) for root in roots.values())
    assert a['000000.jpg'] == b['000000.jpg']  # the CSV z
    assert a['000001.jpg'] != b['000001.jpg'] and a['000002.jpg'] != b['000002.jpg']


def test_warnings_for_unlearned_attributes_and_out_of_range_values(tmp_path, tiny_inputs, capsys):
    root = tmp_path / 'warn'
    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 1, '--hair-color', 0.5, '--eyes', 9)) == 0
    err = capsys.readouterr().err
    assert 'warning: --hair-color 0.5: v3 was never trained on hair_color' in err
    # v3 was trained on the property CNN's scores (all_scores_v2_cnn.csv), whose range is wider than stage 4's
    assert 'warning: --eyes 9 is outside -6.3564 to 3.4492' in err and 'published property-CNN' in err

    # With the property-CNN scores of this root (v2 wrote them; v3 trains on them), their range is the one to respect.
    cnn_scores = Layout(root).property_cnn_scores_csv
    cnn_scores.parent.mkdir(parents=True)
    rows = pd.DataFrame({f'{name}_score': [-1.0, 1.0] for name in UPSTREAM_LABEL})
    rows['pose_score'] = [-2.0, 2.0]
    rows.insert(0, 'img_no', [4, 5])
    rows.to_csv(cnn_scores, index=False)
    assert run_script(SCRIPT, *base_args(tiny_inputs, tmp_path / 'w2', '--num', 1)) == 0
    assert 'warning' not in capsys.readouterr().err  # that root has no scores: the defaults are in range
    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 1, '--outdir', tmp_path / 'o')) == 0
    err = capsys.readouterr().err
    assert 'warning: --eyes 1.8 is outside -1 to 1' in err and 'all_scores_v2_cnn.csv' in err
    assert '--mouth 1.6 is outside' in err and '--pose' not in err

    # v1's labels are stage-4 algorithm-1 scores: the root's statistics file gives their range.
    stats = Layout(tmp_path / 'v1').property_scores_stats(1)
    stats.parent.mkdir(parents=True)
    columns = {f'{name}_score': {'mean': 0, 'std': 1, 'n': 9, 'min': -30.0, 'max': 30.0} for name in UPSTREAM_LABEL}
    columns['pose_score'].update(min=-3.8144, max=7.293)
    stats.write_text(json.dumps({'columns': columns}))

    # v1 learned all seven attributes; a sweep warns about its own values.
    assert run_script(SCRIPT, '--model', 'v1', *base_args(tiny_inputs, tmp_path / 'v1', '--num', 1, '--hair-color',
                                                          0.5, '--weights', tiny_inputs['v1'], '--sweep', 'pose',
                                                          '--values=0,20')) == 0
    err = capsys.readouterr().err
    assert 'never trained' not in err and 'pose 20 in --values is outside -3.8144 to 7.293' in err
    assert 'all_scores_stats.json of this root' in err
    assert (Layout(tmp_path / 'v1').final_inference_dir('v1') / 'sweep_pose' / 'sweep_pose.png').is_file()


def test_bad_input_is_one_line_and_destroys_nothing(tmp_path, tiny_inputs, capsys, reference_dir):
    root = tmp_path / 'run'
    assert run_script(SCRIPT, *base_args(tiny_inputs, root, '--num', 2)) == 0
    before = files_of(root)

    def fails(*argv, match, base=True):
        capsys.readouterr()
        argv = [*base_args(tiny_inputs, root, '--num', 2), *argv] if base else list(argv)
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and match in err, err
        assert files_of(root) == before

    fails('--eyes', 'nan', match='--eyes nan is not a finite number')
    fails('--background-std=-inf', match='--background-std -inf is not a finite number')
    fails('--sweep', 'mouth', '--values=1,inf', match='--values: inf is not a finite number')
    fails('--sweep', 'mouth', '--values=1,1.0', match='lists a value twice')
    fails('--sweep', 'mouth', '--values', 'a,b', match='not a comma-separated list')
    fails('--values', '1,2', match='--values needs --sweep')
    fails('--variation', '-0.1', match='--variation must be in [0, 1000], got -0.1')
    fails('--weights', tiny_inputs['v1'], match='is an Oh-LoRA v1 (or v2) generator')
    fails('--weights', tiny_inputs['v1'], match='it loads with --model v1')
    fails('--model', 'v1', match='is an Oh-LoRA v3 generator')
    fails('--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', match='GenForce model-zoo checkpoint')
    torch.save({'conv1.0.weight': torch.zeros(32, 3, 3, 3), 'fc1.0.weight': torch.zeros(8, 9216)}, tmp_path / 'g.pt')
    fails('--weights', tmp_path / 'g.pt', match='is an Oh-LoRA gender CNN, not the Oh-LoRA v3 generator')
    fails('--weights', tmp_path / 'none.pth', match='no such file')

    wide = tmp_path / 'wide.csv'
    pd.DataFrame([np.zeros(512)], columns=[str(k) for k in range(512)]).to_csv(wide, index=False)
    fails('--z-csv', wide, match='holds a z of 512 values, but the generator takes z of 32')
    two_rows = tmp_path / 'two.csv'
    pd.DataFrame(np.zeros((2, Z_DIM)), columns=[str(k) for k in range(Z_DIM)]).to_csv(two_rows, index=False)
    fails('--z-csv', two_rows, match='holds 2 rows')
    headless = tmp_path / 'headless.csv'
    headless.write_text(','.join(['0.5'] * Z_DIM) + '\n' + ','.join(['0.5'] * Z_DIM) + '\n')
    fails('--z-csv', headless, match='header must be 0,1,...,n-1')
    nan_csv = tmp_path / 'nan.csv'
    nan_csv.write_text(','.join(map(str, range(Z_DIM))) + '\n' + ','.join(['nan'] + ['0'] * (Z_DIM - 1)) + '\n')
    fails('--z-csv', nan_csv, match='NaN')

    # The folder's record of how its images were made is unreadable, or missing.
    record = Layout(root).final_inference_dir('v3') / 'generation_settings.json'
    saved = record.read_bytes()
    record.write_text('[1]')
    before = files_of(root)
    fails(match='is not a settings record of this stage')
    record.unlink()
    before = files_of(root)
    fails(match='already holds 2 images but no generation_settings.json')
    record.write_bytes(saved)
    before = files_of(root)

    # The shipped z (512 values) does not fit a tiny checkpoint; offline without weights: repo, file, --weights.
    fails('--weights', tiny_inputs['v3'], '--root', root, '--no-progress', '--device', 'cpu', base=False,
          match='test_z_vector_0005.csv holds a z of 512 values')
    fails('--root', root, '--no-progress', base=False, match='daebakgazua/250408_OhLoRA_StyleGAN_FineTuned')
    fails('--root', root, '--no-progress', base=False, match='stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth')
    fails('--root', root, '--no-progress', '--model', 'v1', base=False, match='--weights PATH')


@pytest.mark.parametrize('algorithm', [1, 2, 'cnn'])
def test_published_score_ranges_are_those_of_the_published_scores(reference_dir, algorithm):
    """The fallback ranges are min / max of the upstream's published normalised scores (tests/data copies)."""
    data = Layout(reference_dir / 'ohlora' / 'data')
    published = data.property_cnn_scores_csv if algorithm == 'cnn' else data.property_scores_csv(algorithm)
    scores = pd.read_csv(published)
    assert len(scores) == 4703
    derived = {name: (scores[f'{name}_score'].min(), scores[f'{name}_score'].max()) for name in PROPERTY_NAMES}
    assert PUBLISHED_SCORE_RANGES[algorithm] == derived


def test_shipped_test_z_is_the_upstream_file(reference_dir):
    shipped = Layout().test_z_csv
    assert shipped.read_bytes() == (reference_dir / 'ohlora' / 'data' / 'stylegan_modified'
                                    / 'test_z_vector_0005.csv').read_bytes()
    z = read_z_csv(shipped, 512)
    assert z.dtype == np.float64 and abs(z.mean() - (-0.0207)) < 1e-4 and abs(np.sqrt((z ** 2).mean()) - 1.1744) < 1e-4


def test_full_size_v3_file_runs_with_the_shipped_z(tmp_path):
    """The published widths end to end (random weights): the shipped 512-value z fits, 256x256 JPEGs come out."""
    from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3

    torch.manual_seed(0)
    weights = tmp_path / 'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth'
    torch.save(StyleGANGeneratorForV3(resolution=256).state_dict(), weights)
    root = tmp_path / 'root'
    assert run_script(SCRIPT, '--weights', weights, '--root', root, '--num', 2, '--device', 'cpu', '--no-progress') == 0
    folder = Layout(root).final_inference_dir('v3')
    assert [decoded(folder / f'{n:06d}.jpg').shape for n in range(2)] == [(256, 256, 3)] * 2
    record = json.loads((folder / 'generation_settings.json').read_text())
    assert record['z_file'] == 'test_z_vector_0005.csv' and len(pd.read_csv(folder / 'z_vectors.csv').columns) == 513


def test_v2_generator_renders_from_its_trained_file_only(tmp_path, tiny_inputs, capsys):
    """v2's generator is not published: --model v2 reads the file v2 training wrote (v1's layout) or --weights."""
    root = tmp_path / 'root'
    argv = ['--model', 'v2', '--z-csv', tiny_inputs['z_csv'], '--root', root, '--device', 'cpu', '--no-progress',
            '--num', '1']
    assert run_script(SCRIPT, *argv) == 2
    assert 'train the v2 generator with run_stylegan_fine_tuning_v2.py --train-generator' in capsys.readouterr().err
    assert not root.exists()
    assert run_script(SCRIPT, *argv, '--weights', tiny_inputs['v1']) == 0
    assert (Layout(root).final_inference_dir('v2') / '000000.jpg').is_file()
    assert run_script(SCRIPT, '--model', 'v3', *argv[2:], '--weights', tiny_inputs['v1'], '--outdir', tmp_path / 'x') == 2
    assert 'it loads with --model v1 (or v2)' in capsys.readouterr().err
