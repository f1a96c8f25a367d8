"""Stage 1: run_original_generator.py on the tiny GenForce checkpoint of the reference topology."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ohlora.layout import Layout
from script_runner import SCRIPTS, files_of, run_script
from stylegan.checkpoint import load_generator
from stylegan.postprocess import to_uint8
from stylegan.sampling import SamplingRecipe, render_sampled, sampled_latent

SCRIPT = 'run_original_generator.py'


@pytest.fixture(scope='module')
def tiny_generator(tiny_ckpt):
    return load_generator(tiny_ckpt)


def recipe_for(generator, seed=7, mixing=0.0):
    return SamplingRecipe(seed=seed, weights_sha256='0' * 64, generator_key='generator',
                          trunc_psi=1.0, trunc_layers=0, style_mixing_prob=mixing,
                          z_dim=generator.z_space_dim, num_layers=generator.num_layers)


def test_cli_writes_images_and_z_record_deterministically(tmp_path, tiny_ckpt, tiny_generator, capsys):
    first, second = tmp_path / 'a', tmp_path / 'b'
    args = ['--weights', tiny_ckpt, '--num', 6, '--seed', 7, '--device', 'cpu', '--no-progress']
    assert run_script(SCRIPT, *args, '--root', first) == 0
    layout = Layout(first)
    names = sorted(p.name for p in layout.synthesized_dir.iterdir())
    assert names == [f'{n:06d}.jpg' for n in range(6)]
    z = pd.read_csv(layout.synthesized_z_csv)
    assert list(z.columns[:3]) == ['img_no', 'z0', 'z1'] and len(z.columns) == 65 and z['img_no'].tolist() == list(range(6))

    # The image is G(z) in eval mode, no truncation, stored noise, GenForce's uint8 conversion, OpenCV JPEG.
    # (oneDNN may round a value differently for another memory layout, so compare decoded pixels here; the
    # byte-identity of two runs of the same command is checked with real processes below.)
    z_all = torch.tensor(z.iloc[:, 1:].to_numpy(np.float32))
    expected = to_uint8(tiny_generator(z_all, trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image'])
    for n in range(6):
        ok, jpeg = cv2.imencode('.jpg', expected[n][:, :, ::-1])
        written = cv2.imread(str(layout.synthesized_image(n))).astype(int)
        difference = np.abs(written - cv2.imdecode(jpeg, cv2.IMREAD_COLOR))
        assert difference.max() <= 8 and difference.mean() < 0.01

    # The same command in two processes: byte-identical files.
    for root in (second, tmp_path / 'b2'):
        command = [sys.executable, str(SCRIPTS / SCRIPT), *map(str, args), '--root', str(root)]
        subprocess.run(command, check=True, capture_output=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert files_of(second / 'stylegan') == files_of(tmp_path / 'b2' / 'stylegan')
    assert Layout(second).synthesized_z_csv.read_bytes() == layout.synthesized_z_csv.read_bytes()

    # Batch size 1: the same z record, images equal up to float rounding.
    third = tmp_path / 'c'
    assert run_script(SCRIPT, *args, '--root', third, '--batch-size', 1) == 0
    assert Layout(third).synthesized_z_csv.read_bytes() == layout.synthesized_z_csv.read_bytes()
    for n in range(6):
        a = cv2.imread(str(layout.synthesized_image(n))).astype(int)
        b = cv2.imread(str(Layout(third).synthesized_image(n))).astype(int)
        # a ±1 change of a few uint8 values spreads over its JPEG block, but stays tiny
        assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 0.05

    # Rerun: nothing is written again.
    before = {p: p.stat().st_mtime_ns for p in (first / 'stylegan').rglob('*')}
    capsys.readouterr()
    assert run_script(SCRIPT, *args, '--root', first) == 0
    assert 'wrote 0 images' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (first / 'stylegan').rglob('*')} == before


def test_latents_depend_only_on_seed_and_index():
    assert torch.equal(sampled_latent(7, 5, 64), sampled_latent(7, 5, 64))
    assert not torch.equal(sampled_latent(7, 5, 64), sampled_latent(7, 6, 64))
    assert not torch.equal(sampled_latent(7, 5, 64), sampled_latent(8, 5, 64))


def test_batch_size_changes_only_rounding(tiny_generator):
    recipe = recipe_for(tiny_generator)
    numbers = list(range(8))
    z = torch.stack([sampled_latent(7, n, 64) for n in numbers])
    batched = render_sampled(tiny_generator, z, recipe, numbers).astype(int)
    single = np.concatenate([render_sampled(tiny_generator, z[n:n + 1], recipe, [n]) for n in numbers]).astype(int)
    assert np.abs(batched - single).max() <= 1
    assert np.mean(batched != single) <= 0.0005


def test_style_mixing_is_per_image_and_reproducible(tiny_generator):
    numbers = list(range(12))
    z = torch.stack([sampled_latent(7, n, 64) for n in numbers])
    plain = render_sampled(tiny_generator, z, recipe_for(tiny_generator), numbers)
    mixed = render_sampled(tiny_generator, z, recipe_for(tiny_generator, mixing=0.9), numbers)
    again = np.concatenate([render_sampled(tiny_generator, z[n:n + 1], recipe_for(tiny_generator, mixing=0.9), [n])
                            for n in numbers])
    assert np.abs(mixed.astype(int) - again).max() <= 1
    changed = [not np.array_equal(plain[n], mixed[n]) for n in numbers]
    assert 6 <= sum(changed) < 12  # about 90 % of the images are mixed, decided per image


def test_bad_input_is_one_line_and_destroys_nothing(tmp_path, tiny_ckpt, capsys):
    root = tmp_path / 'run'
    base = ['--weights', tiny_ckpt, '--seed', 7, '--device', 'cpu', '--no-progress', '--root', root]
    assert run_script(SCRIPT, *base, '--num', 2) == 0
    before = files_of(root)

    def fails(*argv, match):
        capsys.readouterr()
        assert run_script(SCRIPT, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and match in err, err
        assert files_of(root) == before

    fails('--num', 0, '--root', root, '--weights', tiny_ckpt, match='--num must be in [1, 1000000]')
    fails('--num', 3, '--root', root, '--weights', tmp_path / 'missing.pth', match='no such file')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(tiny_ckpt.read_bytes()[:100_000])
    fails('--num', 3, '--root', root, '--weights', truncated, match='truncated or corrupt')
    other = tmp_path / 'other.pth'
    torch.save({'conv1.0.weight': torch.zeros(4, 3, 3, 3)}, other)
    fails('--num', 3, '--root', root, '--weights', other, match=str(other))
    fails(*base, '--num', 3, '--seed', 8, match='other settings')
    (root / 'stylegan' / 'synthesize_results' / 'notes.txt').write_text('mine')
    before = files_of(root)
    fails(*base, '--num', 3, match='not stage-1 images')
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    capsys.readouterr()
    assert run_script(SCRIPT, '--weights', tiny_ckpt, '--num', 1, '--root', blocker, '--no-progress') == 2
    assert 'cannot write' in capsys.readouterr().err


def test_offline_without_weights_says_where_to_get_them(tmp_path, capsys):
    assert run_script(SCRIPT, '--num', 1, '--root', tmp_path) == 2
    err = capsys.readouterr().err
    assert 'GenForce' in err and '--weights' in err and 'genforce/genforce#44' in err
    assert not (tmp_path / 'stylegan' / 'synthesize_results').exists()


def test_published_import_moves_the_images_and_marks_the_source(tmp_path, monkeypatch, capsys, tiny_ckpt):
    import json

    import stylegan.sampling as sampling
    import ohlora.weights as weights

    def fake_download(repo_id, dest_dir, description):
        assert repo_id == 'daebakgazua/250408_OhLoRA_all_generated_images'
        staging = dest_dir.parent / '.tmp-download-fake'
        (staging / 'images').mkdir(parents=True)
        for n in (0, 1, 9999):
            (staging / 'images' / f'{n:06d}.jpg').write_bytes(b'jpeg %d' % n)
        (staging / 'README.jpg').write_bytes(b'not an image number')
        return staging

    monkeypatch.setattr(weights, 'fetch_dataset_images', fake_download)
    root = tmp_path / 'published'
    assert run_script(SCRIPT, '--published', '--root', root) == 0
    layout = Layout(root)
    assert sorted(p.name for p in layout.synthesized_dir.iterdir()) == ['000000.jpg', '000001.jpg', '009999.jpg']
    assert layout.synthesized_image(9999).read_bytes() == b'jpeg 9999'
    assert json.loads(layout.synthesized_meta.read_text())['source'] == 'published'
    assert not (root / 'stylegan' / '.tmp-download-fake').exists()
    # sampling into the imported folder is refused, and nothing changes
    before = files_of(root)
    capsys.readouterr()
    assert run_script(SCRIPT, '--weights', tiny_ckpt, '--num', 1, '--root', root, '--no-progress') == 2
    assert 'imported with --published' in capsys.readouterr().err
    assert files_of(root) == before


def test_published_import_offline_is_one_line(tmp_path, capsys):
    assert run_script(SCRIPT, '--published', '--root', tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'daebakgazua/250408_OhLoRA_all_generated_images' in err
