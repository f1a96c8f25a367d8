"""Stages 1 and 6 (the generators): resume keyed on content, damaged weights, out-of-range options, odd files in
the output folder, write failures (issue 10). Every refusal: one ``error:`` line, exit status 2, nothing changed."""
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ohlora.layout import Layout
from rerun_helpers import assert_refused, snapshot, temporaries
from script_runner import run_script

STAGE1, STAGE6 = 'run_original_generator.py', 'run_fine_tuned_generator.py'
Z_DIM = 32  # the tiny conditional checkpoints' z width


@pytest.fixture(scope='module')
def tiny_ckpt(reference_dir):
    return reference_dir / 'genforce' / 'tiny_ckpt.pth'


def resaved(source: Path, dest: Path, change=lambda obj: None) -> Path:
    """``source`` saved again to ``dest`` after ``change``: other values, the same shapes, hence the same size as
    another copy saved this way under the same name."""
    obj = torch.load(source, map_location='cpu', weights_only=True)
    change(obj)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, dest)
    return dest


def stage1(root, weights, *extra):
    return ['--weights', weights, '--root', root, '--device', 'cpu', '--no-progress', '--seed', 3, *extra]


# --- stage 1 -----------------------------------------------------------------------------------------------

def test_stage1_resume_refuses_other_weights_of_the_same_name_and_size(tmp_path, tiny_ckpt, capsys):
    root = tmp_path / 'run'
    first = resaved(tiny_ckpt, tmp_path / 'first' / 'stylegan_model.pth')
    assert run_script(STAGE1, *stage1(root, first, '--num', 2)) == 0

    def nudge(obj):
        obj['generator']['mapping.dense0.weight'][0, 0] += 0.5
    other = resaved(tiny_ckpt, tmp_path / 'other' / 'stylegan_model.pth', nudge)
    assert other.stat().st_size == first.stat().st_size and other.read_bytes() != first.read_bytes()
    err = assert_refused(capsys, root, STAGE1, *stage1(root, other, '--num', 3), match='other settings (weights_sha256')
    assert 'use another --root' in err

    # The same bytes under another name resume: the record holds the content, not the name.
    renamed = tmp_path / 'renamed.pth'
    renamed.write_bytes(first.read_bytes())
    assert run_script(STAGE1, *stage1(root, renamed, '--num', 3)) == 0
    assert sorted(p.name for p in Layout(root).synthesized_dir.iterdir()) == [f'{n:06d}.jpg' for n in range(3)]
    meta = json.loads(Layout(root).synthesized_meta.read_text())
    assert meta['source'] == 'sampled' and meta['settings']['weights_sha256'] == \
        hashlib.sha256(first.read_bytes()).hexdigest()


def test_stage1_refuses_nan_weights_and_bad_options_before_anything_runs(tmp_path, tiny_ckpt, capsys):
    root = tmp_path / 'run'
    assert run_script(STAGE1, *stage1(root, tiny_ckpt, '--num', 2)) == 0

    def poison(obj):
        obj['generator']['synthesis.layer3.weight'][0, 0, 0, 0] = float('nan')
    nan_ckpt = resaved(tiny_ckpt, tmp_path / 'nan.pth', poison)
    assert_refused(capsys, root, STAGE1, *stage1(root, nan_ckpt, '--num', 3),
                   match='nan.pth holds NaN or infinite values (synthesis.layer3.weight)')
    for option, value, message in [('--trunc-psi', 'nan', '--trunc-psi nan is not a finite number'),
                                   ('--trunc-psi', 'inf', '--trunc-psi inf is not a finite number'),
                                   ('--trunc-psi', '1e308', '--trunc-psi must be in [-1000, 1000], got 1e+308'),
                                   ('--trunc-psi', '-1e308', '--trunc-psi must be in [-1000, 1000], got -1e+308'),
                                   ('--trunc-layers', '-3', '--trunc-layers must be 0 or more, got -3'),
                                   ('--trunc-layers', '99', '--trunc-layers 99 exceeds the 14 layers'),
                                   ('--style-mixing-prob', 'nan', '--style-mixing-prob nan is not a finite number'),
                                   ('--style-mixing-prob', '1.5', '--style-mixing-prob must be in [0, 1]'),
                                   ('--num', '1000001', '--num must be in [1, 1000000] (image names have six')]:
        assert_refused(capsys, root, STAGE1, *stage1(root, tiny_ckpt, '--num', 3, option, value), match=message)
    # Refused before the weights are even looked at:
    assert_refused(capsys, root, STAGE1, *stage1(root, tmp_path / 'missing.pth', '--trunc-psi', 'nan'),
                   match='--trunc-psi nan')


def test_stage1_odd_files_and_records_are_one_line(tmp_path, tiny_ckpt, capsys):
    root = tmp_path / 'run'
    layout = Layout(root)
    assert run_script(STAGE1, *stage1(root, tiny_ckpt, '--num', 2)) == 0
    folder = layout.synthesized_dir

    # Only regular files count as finished images: a folder or a symlink loop under an image name is refused.
    (folder / '000013.jpg').mkdir()
    assert_refused(capsys, root, STAGE1, *stage1(root, tiny_ckpt, '--num', 20),
                   match='000013.jpg is a folder, not a stage-1 image; move it away')
    (folder / '000013.jpg').rmdir()
    (folder / '000013.jpg').symlink_to(folder / '000013.jpg')
    assert_refused(capsys, root, STAGE1, *stage1(root, tiny_ckpt, '--num', 20),
                   match='000013.jpg is a symbolic link, not a stage-1 image')
    (folder / '000013.jpg').unlink()

    # A meta JSON of the wrong type: one line (stage 1 and stage 2, which reads it for the labels).
    meta = layout.synthesized_meta.read_bytes()
    for text in ('[]', '"sampled"', '{broken'):
        layout.synthesized_meta.write_text(text)
        assert_refused(capsys, root, STAGE1, *stage1(root, tiny_ckpt, '--num', 3),
                       match='synthesize_results_meta.json is not a stage-1 record')
        assert_refused(capsys, root, 'run_cnn.py', '--root', root, '--no-progress', '--workers', 0,
                       match='synthesize_results_meta.json is not a stage-1 record')
    layout.synthesized_meta.write_bytes(meta)

    # A zero-byte (or otherwise damaged) z record is derived data: the rerun rebuilds it.
    z_record = layout.synthesized_z_csv.read_bytes()
    layout.synthesized_z_csv.write_bytes(b'')
    assert run_script(STAGE1, *stage1(root, tiny_ckpt, '--num', 2)) == 0
    assert layout.synthesized_z_csv.read_bytes() == z_record

    # --root under a regular file: refused before the weights are fetched or loaded.
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert_refused(capsys, tmp_path, STAGE1, *stage1(blocker / 'root', tmp_path / 'missing.pth', '--num', 1),
                   match=f'cannot write into {blocker}/root/stylegan/synthesize_results: {blocker} is a file')


# --- stage 6 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_inputs(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stage6_reruns')
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save({k: v.clone() for k, v in tiny['state_dicts']['v3_generator'].items()}, folder / 'v3.pth')
    other = {k: v.clone() for k, v in tiny['state_dicts']['v3_generator'].items()}
    other['mapping.label_weight'] += 0.25
    (folder / 'other').mkdir()
    torch.save(other, folder / 'other' / 'v3.pth')
    poisoned = {k: v.clone() for k, v in other.items()}
    poisoned['mapping.label_weight'][0, 0] = float('inf')
    torch.save(poisoned, folder / 'inf.pth')
    z = np.random.default_rng(5).standard_normal(Z_DIM)
    pd.DataFrame([z], columns=[str(k) for k in range(Z_DIM)]).to_csv(folder / 'z.csv', index=False)
    return folder


def stage6(inputs, root, *extra, weights=None):
    return ['--weights', weights or inputs / 'v3.pth', '--z-csv', inputs / 'z.csv', '--root', root,
            '--device', 'cpu', '--no-progress', '--num', 2, *extra]


def test_stage6_resume_is_keyed_on_the_weights_and_z_content(tmp_path, tiny_inputs, capsys):
    root = tmp_path / 'run'
    assert run_script(STAGE6, *stage6(tiny_inputs, root)) == 0
    other = tiny_inputs / 'other' / 'v3.pth'
    assert other.stat().st_size == (tiny_inputs / 'v3.pth').stat().st_size
    assert_refused(capsys, root, STAGE6, *stage6(tiny_inputs, root, '--num', 3, weights=other),
                   match='holds images made with other settings (weights_sha256')
    # The same z under another file name resumes; other z values under the same name do not.
    renamed = tmp_path / 'renamed_z.csv'
    renamed.write_bytes((tiny_inputs / 'z.csv').read_bytes())
    argv = stage6(tiny_inputs, root, '--num', 3)
    argv[argv.index('--z-csv') + 1] = renamed
    assert run_script(STAGE6, *argv) == 0
    pd.DataFrame([np.ones(Z_DIM)], columns=[str(k) for k in range(Z_DIM)]).to_csv(renamed, index=False)
    assert_refused(capsys, root, STAGE6, *argv, match='other settings (z_sha256')


def test_stage6_refuses_damaged_weights_and_overflowing_values(tmp_path, tiny_inputs, capsys):
    root = tmp_path / 'run'
    assert run_script(STAGE6, *stage6(tiny_inputs, root)) == 0
    assert_refused(capsys, root, STAGE6, *stage6(tiny_inputs, root, weights=tiny_inputs / 'inf.pth'),
                   match='inf.pth holds NaN or infinite values (mapping.label_weight)')
    for extra, message in [(['--eyes', '1e308'], '--eyes must be in [-1000, 1000], got 1e+308'),
                           (['--eyes', '-1e308'], '--eyes must be in [-1000, 1000], got -1e+308'),
                           (['--mouth', '1e400'], '--mouth inf is not a finite number'),
                           (['--pose', '-inf'], '--pose -inf is not a finite number'),
                           (['--variation', '1e308'], '--variation must be in [0, 1000]'),
                           (['--num', '1000001'], '--num must be at most 1000000'),
                           (['--sweep', 'eyes', '--values', '-1,1e308'], '--values: must be in [-1000, 1000]')]:
        assert_refused(capsys, root, STAGE6, *stage6(tiny_inputs, root, *extra), match=message)


def test_stage6_negative_sweep_values_need_no_equals_sign(tmp_path, tiny_inputs):
    root = tmp_path / 'run'
    assert run_script(STAGE6, *stage6(tiny_inputs, root, '--sweep', 'mouth', '--values', '-1,0,1',
                                      '--eyes', '-1.5')) == 0
    folder = Layout(root).final_inference_dir('v3') / 'sweep_mouth'
    assert sorted(p.name for p in folder.glob('000000_*.jpg')) == \
        ['000000_mouth_-1.0.jpg', '000000_mouth_0.0.jpg', '000000_mouth_1.0.jpg']


def test_stage6_odd_entries_and_failed_writes_are_one_line(tmp_path, tiny_inputs, capsys, monkeypatch):
    root = tmp_path / 'run'
    assert run_script(STAGE6, *stage6(tiny_inputs, root, '--batch-size', 1)) == 0  # batch 1: bytes comparable
    folder = Layout(root).final_inference_dir('v3')
    (folder / '000002.jpg').mkdir()  # a folder named like the next image
    assert_refused(capsys, root, STAGE6, *stage6(tiny_inputs, root, '--num', 3),
                   match='000002.jpg is a folder, not a stage-6 image; move it away')
    (folder / '000002.jpg').rmdir()

    # An --outdir that is a file, and a full disk in the middle of a run.
    blocker = tmp_path / 'out_file'
    blocker.write_text('x')
    assert_refused(capsys, tmp_path, STAGE6, *stage6(tiny_inputs, root, '--outdir', blocker),
                   match=f'cannot write into {blocker}: it is a file')
    real = Path.write_bytes

    def full_disk(self, data):
        if self.suffix == '.jpg' and self.name.startswith('.tmp-'):
            real(self, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, 'write_bytes', full_disk)
    capsys.readouterr()
    assert run_script(STAGE6, *stage6(tiny_inputs, root, '--num', 4, '--batch-size', 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: cannot write {folder}/000002.jpg: No space left on device'
    monkeypatch.undo()
    assert not temporaries(root) and sorted(p.name for p in folder.glob('*.jpg')) == ['000000.jpg', '000001.jpg']
    assert run_script(STAGE6, *stage6(tiny_inputs, root, '--num', 4, '--batch-size', 1)) == 0  # the rerun finishes
    fresh = tmp_path / 'fresh'
    assert run_script(STAGE6, *stage6(tiny_inputs, fresh, '--num', 4, '--batch-size', 1)) == 0
    assert snapshot(folder) == snapshot(Layout(fresh).final_inference_dir('v3'))


def test_stage6_folders_where_records_go_are_refused(tmp_path, tiny_inputs, capsys):
    root = tmp_path / 'run'
    folder = Layout(root).final_inference_dir('v3') / 'sweep_eyes'
    for name in ('generation_settings.json', 'z_vectors.csv', 'sweep_eyes.png'):
        (folder / name).mkdir(parents=True)
        assert_refused(capsys, root, STAGE6, *stage6(tiny_inputs, root, '--sweep', 'eyes'),
                       match=f'cannot write {folder / name}: it is a folder')
        (folder / name).rmdir()
