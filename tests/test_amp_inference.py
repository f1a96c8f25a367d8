"""``--amp`` (bfloat16 autocast) on the CPU: outputs within the tolerance docs/scale-out-inference.md states,
recorded in the stage's settings (float32 records stay as they were), and never mixed with float32 outputs:
stages 1 and 6 and the directions sampling refuse a resume with the other setting, naming it; stage 3 (derived
data) parses everything again.
"""
import json

import cv2
import numpy as np
import pandas as pd
import torch

from ohlora.layout import Layout
from rerun_helpers import assert_refused
from script_runner import run_script
from test_sharded_stages import stage3_inputs

# The stated tolerance of --amp images (JPEG pixels against float32, in uint8 levels) on the test checkpoints:
# measured mean 2.2-2.6 and 99th percentile 10-11 (docs/scale-out-inference.md); bounds with a margin.
MEAN_LEVELS, P99_LEVELS = 4.0, 16


def jpeg_differences(pairs) -> np.ndarray:
    return np.stack([np.abs(cv2.imread(str(a)).astype(int) - cv2.imread(str(b)).astype(int)) for a, b in pairs])


def within_tolerance(d: np.ndarray) -> bool:
    return d.mean() <= MEAN_LEVELS and np.percentile(d, 99) <= P99_LEVELS and d.mean() > 0


def test_stage1_amp_is_close_recorded_and_never_mixed(tmp_path, reference_dir, capsys):
    script = 'run_original_generator.py'
    args = ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth', '--num', 8, '--batch-size', 4, '--seed', 5,
            '--device', 'cpu', '--no-progress']
    plain, amp = Layout(tmp_path / 'plain'), Layout(tmp_path / 'amp')
    assert run_script(script, *args, '--root', plain.root) == 0
    assert run_script(script, *args, '--amp', '--root', amp.root) == 0
    assert within_tolerance(jpeg_differences([(plain.synthesized_image(n), amp.synthesized_image(n))
                                              for n in range(8)]))
    assert plain.synthesized_z_csv.read_bytes() == amp.synthesized_z_csv.read_bytes()  # the same z
    assert 'amp' not in json.loads(plain.synthesized_meta.read_text())['settings']
    assert json.loads(amp.synthesized_meta.read_text())['settings']['amp'] == 'bfloat16'
    assert_refused(capsys, amp.root, script, *args, '--num', 9, '--root', amp.root,
                   match="made with other settings (amp 'bfloat16' -> None)")
    assert_refused(capsys, plain.root, script, *args, '--amp', '--num', 9, '--root', plain.root,
                   match="(amp None -> 'bfloat16')")
    assert run_script(script, *args, '--amp', '--num', 9, '--root', amp.root) == 0  # the same setting resumes


def test_stage6_amp_is_close_recorded_and_never_mixed(tmp_path, cond_stylegan_tiny, capsys):
    script = 'run_fine_tuned_generator.py'
    torch.save(cond_stylegan_tiny['state_dicts']['v3_generator'], tmp_path / 'v3.pth')
    pd.DataFrame([np.random.default_rng(1).standard_normal(32)], columns=[str(k) for k in range(32)]).to_csv(
        tmp_path / 'z.csv', index=False)
    args = ['--weights', tmp_path / 'v3.pth', '--z-csv', tmp_path / 'z.csv', '--num', 8, '--device', 'cpu',
            '--no-progress']
    assert run_script(script, *args, '--root', tmp_path / 'plain') == 0
    assert run_script(script, *args, '--amp', '--root', tmp_path / 'amp') == 0
    plain, amp = (Layout(tmp_path / name).generation_folder('v3') for name in ('plain', 'amp'))
    assert within_tolerance(jpeg_differences([(plain.image(n), amp.image(n)) for n in range(8)]))
    assert json.loads(amp.settings_json.read_text())['settings']['amp'] == 'bfloat16'
    assert 'amp' not in json.loads(plain.settings_json.read_text())['settings']
    assert_refused(capsys, tmp_path / 'amp', script, *args, '--root', tmp_path / 'amp',
                   match="(amp 'bfloat16' -> None)")


def test_directions_sampling_amp_is_recorded_and_never_mixed(tmp_path, reference_dir, capsys):
    from stylegan_modified.property_score_cnn import PropertyScoreCNN

    torch.manual_seed(0)
    torch.save(PropertyScoreCNN().state_dict(), tmp_path / 'cnn.pth')
    args = ['find_attribute_directions.py', '--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth',
            '--property-cnn', tmp_path / 'cnn.pth', '--num', 10, '--holdout', 0.25, '--chunk-size', 5,
            '--batch-size', 5, '--device', 'cpu', '--no-progress', '--root', tmp_path]
    assert run_script(*args, '--amp') == 0
    samples = Layout(tmp_path).direction_samples()
    assert json.loads(samples.settings_json.read_text())['extra'] == {'amp': 'bfloat16'}
    assert_refused(capsys, tmp_path, *args, match="extra.amp 'bfloat16' -> None")


def test_stage3_amp_is_recorded_and_parses_everything_again(tmp_path, facexformer_dir, synthetic_facexformer,
                                                            capsys):
    weights = synthetic_facexformer
    layout = Layout(tmp_path / 'root')
    stage3_inputs(layout.filtered_dir, facexformer_dir)
    args = ['run_segmentation.py', '--weights', weights, '--device', 'cpu', '--no-progress', '--batch-size', 4,
            '--root', layout.root]
    assert run_script(*args) == 0
    plain = {n: cv2.imread(str(layout.parsing_map(n)), cv2.IMREAD_UNCHANGED) for n in (1, 4, 5, 12)}
    capsys.readouterr()
    assert run_script(*args, '--amp') == 0  # other settings: derived data is made again, not mixed
    assert capsys.readouterr().out.startswith('parsed 4 images (0 already there)')
    assert json.loads(layout.segmentation_meta.read_text())['settings']['amp'] == 'bfloat16'
    differing = np.mean([np.mean(cv2.imread(str(layout.parsing_map(n)), cv2.IMREAD_UNCHANGED) != plain[n])
                         for n in plain])
    assert differing <= 0.10  # measured 2-5 % on these faces with the synthetic weights (near-tie-rich logits)
