"""``kill -9`` in the middle of every stage, then a rerun: the files are byte-identical to an uninterrupted run's,
no temporary file is left, and no process of the killed run lives on (issue 10).

Each stage runs as a real process; a prelude slows one step down so the kill lands mid-run.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ohlora import atomic
from ohlora.layout import Layout
from rerun_helpers import kill_when, run_to_end, snapshot, temporaries, wait_gone
from script_runner import run_script

SLOW = '''
import time, importlib
def slow_down(module_name, name, seconds):
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)
    setattr(module, name, slowed)
'''


def count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def test_stage1_killed_and_resumed(tmp_path, reference_dir):
    args = ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', '--num', 9, '--batch-size', 2, '--seed', 5,
            '--device', 'cpu', '--no-progress']
    assert run_script('run_original_generator.py', *args, '--root', tmp_path / 'ref') == 0
    killed = Layout(tmp_path / 'killed')
    prelude = SLOW + "slow_down('stylegan.sampling', 'render_sampled', 0.4)"
    kill_when('run_original_generator.py', [*args, '--root', killed.root],
              lambda: count(killed.synthesized_dir, '0*.jpg') >= 3, prelude)
    assert 3 <= count(killed.synthesized_dir, '0*.jpg') < 9
    run_to_end('run_original_generator.py', [*args, '--root', killed.root])
    assert snapshot(killed.root) == snapshot(tmp_path / 'ref') and not temporaries(killed.root)


def test_stage6_killed_and_resumed(tmp_path, reference_dir):
    tiny = torch.load(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt', map_location='cpu', weights_only=True)
    torch.save(tiny['state_dicts']['v3_generator'], tmp_path / 'v3.pth')
    pd.DataFrame([np.random.default_rng(1).standard_normal(32)], columns=[str(k) for k in range(32)]).to_csv(
        tmp_path / 'z.csv', index=False)
    args = ['--weights', tmp_path / 'v3.pth', '--z-csv', tmp_path / 'z.csv', '--sweep', 'eyes', '--values', '-1,0,1',
            '--num', 3, '--batch-size', 2, '--device', 'cpu', '--no-progress']
    assert run_script('run_fine_tuned_generator.py', *args, '--root', tmp_path / 'ref') == 0
    killed = tmp_path / 'killed'
    folder = Layout(killed).final_inference_dir('v3') / 'sweep_eyes'
    prelude = SLOW + "slow_down('stylegan_modified.generation', 'render_labelled', 0.4)"
    kill_when('run_fine_tuned_generator.py', [*args, '--root', killed], lambda: count(folder, '*.jpg') >= 3, prelude)
    assert not (folder / 'sweep_eyes.png').exists()
    run_to_end('run_fine_tuned_generator.py', [*args, '--root', killed])
    assert snapshot(killed) == snapshot(tmp_path / 'ref') and not temporaries(killed)


def test_stage2_killed_and_resumed_leaves_no_loader_process(tmp_path):
    from test_stage2_cnn_script import COLOURS, channel_net, draw_root, FOLD_BIAS

    weights = tmp_path / 'weights'
    for prop in ('gender', 'quality'):
        for fold, bias in enumerate(FOLD_BIAS):
            atomic.torch_save(weights / f'{prop}_model_{fold}.pt', channel_net(prop, bias))
    colours = COLOURS[:4]  # two batches: the kill falls between them
    for name in ('ref', 'killed'):
        draw_root(tmp_path / name, colours, labels=False)
    args = ['--weights', weights, '--batch-size', 2, '--workers', 1, '--device', 'cpu', '--no-progress']
    assert run_script('run_cnn.py', *args, '--root', tmp_path / 'ref') == 0
    killed = Layout(tmp_path / 'killed')
    prelude = SLOW + ("slow_down('cnn.scoring', 'ensemble_outputs', 0.25)\n"
                      "import cnn.scoring; cnn.scoring.score_images.__kwdefaults__['checkpoint_every'] = 2")
    children = kill_when('run_cnn.py', [*args, '--root', killed.root],
                         lambda: killed.cnn_partial_scores('gender').is_file(), prelude)
    assert children and not wait_gone(children)  # the DataLoader's decoding worker exits with its parent
    assert not killed.cnn_inference_csv('gender').exists()
    result = run_to_end('run_cnn.py', [*args, '--root', killed.root])
    assert 'reusing' in result.stdout
    assert snapshot(killed.root) == snapshot(tmp_path / 'ref') and not temporaries(killed.root)


STAGE3_PRELUDE = SLOW + '''
import torch, segmentation.facexformer, segmentation.parsing

class StandIn:
    """FaceXFormer's segment() interface, cheap and slow: the class follows the red channel."""
    def to(self, device):
        return self
    def segment(self, x):
        time.sleep(0.4)
        classes = torch.arange(11, dtype=x.dtype).view(1, 11, 1, 1)
        return -(x[:, :1] * 2.5 + 5 - classes).abs()

segmentation.facexformer.load_facexformer = lambda path, device: StandIn()
segmentation.parsing.RECORD_EVERY = 2
'''


def test_stage3_killed_and_resumed(tmp_path, reference_dir, monkeypatch):
    import segmentation.facexformer
    from test_stage3_segmentation import StandInParser, drawn_on_canvas

    weights = tmp_path / 'stand_in.pt'
    weights.write_bytes(b'the stand-in parser needs no weights')
    for name in ('ref', 'killed'):
        folder = Layout(tmp_path / name).filtered_dir
        folder.mkdir(parents=True)
        canvas = drawn_on_canvas(reference_dir / 'facexformer')
        for n in range(6):
            canvas.rotate(3 * n).save(folder / f'{n:06d}.jpg', quality=95)
        Image.new('RGB', (8, 8)).save(folder / '000002.jpg')  # too small: skipped
    args = ['--weights', weights, '--batch-size', 2, '--device', 'cpu', '--no-progress']
    with monkeypatch.context() as patch:  # the same stand-in parser, in this process
        patch.setattr(segmentation.facexformer, 'load_facexformer', lambda path, device: StandInParser())
        assert run_script('run_segmentation.py', *args, '--root', tmp_path / 'ref') == 0
    killed = Layout(tmp_path / 'killed')
    kill_when('run_segmentation.py', [*args, '--root', killed.root],
              lambda: count(killed.segmentation_dir, 'parsing_0*.png') >= 2, STAGE3_PRELUDE)
    run_to_end('run_segmentation.py', [*args, '--root', killed.root], STAGE3_PRELUDE)
    ours, theirs = snapshot(killed.root), snapshot(tmp_path / 'ref')
    meta = 'segmentation/segmentation_results/segmentation_meta.json'
    a, b = json.loads(ours.pop(meta)), json.loads(theirs.pop(meta))
    assert (a['settings'], a['inputs']) == (b['settings'], b['inputs'])  # the run counters differ, by design
    assert ours == theirs and not temporaries(killed.root)
    assert pd.read_csv(killed.segmentation_skipped_csv)['img_no'].tolist() == [2]


def test_stage4_killed_pool_workers_exit_and_the_rerun_is_identical(tmp_path, reference_dir):
    from test_property_scores_stage import make_root

    fixtures = reference_dir / 'ohlora' / 'property_scores' / 'fixtures'
    for name in ('ref', 'killed'):
        make_root(tmp_path / name, fixtures, range(12))
    args = ['--workers', 2, '--batch-size', 2, '--no-progress']
    assert run_script('compute_property_scores.py', *args, '--root', tmp_path / 'ref') == 0
    killed = Layout(tmp_path / 'killed')
    started = tmp_path / 'started'
    started.mkdir()
    prelude = SLOW + f'''
import os, pathlib, segmentation.property_scores as stage
stage.MIN_IMAGES_PER_WORKER = 1
original = stage.score_image
def marked(*args, **kwargs):
    pathlib.Path({str(started)!r}, str(os.getpid())).touch()
    time.sleep(30)
    return original(*args, **kwargs)
stage.score_image = marked
'''
    children = kill_when('compute_property_scores.py', [*args, '--root', killed.root],
                         lambda: count(started, '*') >= 2, prelude)
    workers = [int(p.name) for p in started.iterdir()]
    assert set(workers) <= set(children) and len(workers) == 2
    assert not wait_gone(children, timeout=10)  # before the fix they slept on, then waited forever
    run_to_end('compute_property_scores.py', [*args, '--root', killed.root])
    assert snapshot(killed.root) == snapshot(tmp_path / 'ref') and not temporaries(killed.root)
