"""Stages 2-4 (scoring, parsing, property scores): results follow their inputs' content, options out of range and
odd files are one line, "run stage N first" says what happened when stage N ran (issue 10)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnn.training import TrainingSamples
from ohlora import atomic
from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from rerun_helpers import assert_refused, snapshot
from script_runner import run_script
from segmentation import property_scores
from segmentation.face_detection import FaceDetector
from segmentation.parsing import NO_FACE, StageRecord, list_input_images, plan_work, run_stage
from test_property_scores_stage import make_root
from test_stage2_cnn_script import COLOURS, cli, draw_root, weights_dir  # noqa: F401 (weights_dir: a fixture)
from test_stage3_segmentation import STAND_IN_SETTINGS, StandInParser, drawn_on_canvas

STAGE2, STAGE3, STAGE4 = 'run_cnn.py', 'run_segmentation.py', 'compute_property_scores.py'


# --- stage 2 -----------------------------------------------------------------------------------------------

def test_stage2_scores_follow_the_image_content(tmp_path, weights_dir, capsys):
    layout = draw_root(tmp_path, COLOURS[2:], labels=False)  # (red, green): 0 and 3 kept; 1 bad quality, 2 a man
    assert cli(tmp_path, weights_dir) == 0
    kept = sorted(p.name for p in layout.filtered_dir.iterdir())
    assert kept == ['000000.jpg', '000003.jpg']
    before = pd.read_csv(layout.cnn_merged_csv).set_index('img_no')

    # Image 1 is replaced under the same name (new bytes: a kept face now), image 0 is only touched.
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 230, 230, 90
    atomic.write_image(layout.synthesized_image(1), rgb[:, :, ::-1])
    capsys.readouterr()
    assert cli(tmp_path, weights_dir) == 0
    out = capsys.readouterr().out
    assert '1 images changed since they were scored' in out and 'reusing 3 scores' in out
    after = pd.read_csv(layout.cnn_merged_csv).set_index('img_no')
    assert after.loc[1, 'quality_score'] > 0.9 > before.loc[1, 'quality_score']
    assert after.drop(index=1).equals(before.drop(index=1))
    assert sorted(p.name for p in layout.filtered_dir.iterdir()) == ['000000.jpg', '000001.jpg', '000003.jpg']
    assert (layout.filtered_dir / '000001.jpg').read_bytes() == layout.synthesized_image(1).read_bytes()
    scoring = json.loads(layout.cnn_record('scoring').read_text())
    assert scoring['images']['1'] == __import__('hashlib').sha256(layout.synthesized_image(1).read_bytes()).hexdigest()


def test_stage2_refuses_thresholds_outside_0_1_and_odd_roots(tmp_path, weights_dir, capsys):
    layout = draw_root(tmp_path, COLOURS[2:], labels=False)
    assert cli(tmp_path, weights_dir) == 0
    base = ['--root', tmp_path, '--weights', weights_dir, '--no-progress', '--workers', 0]
    for option, value in [('--quality-threshold', '5'), ('--gender-threshold', '-0.1'),
                          ('--quality-threshold', 'nan'), ('--gender-threshold', '1.0001')]:
        assert_refused(capsys, tmp_path, STAGE2, *base, option, value,
                       match=f'{option} must be in [0, 1]' if value != 'nan' else f'{option} nan is not a finite')

    # Stage 1 ran, but its images are gone: say so rather than "run stage 1 first".
    empty = tmp_path / 'empty'
    atomic.write_json(Layout(empty).synthesized_meta, {'source': 'sampled', 'settings': {}})
    Layout(empty).synthesized_dir.mkdir()
    assert_refused(capsys, empty, STAGE2, '--root', empty, '--no-progress',
                   match='holds no images, although')
    # --root under a regular file: refused before any weights are read.
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert_refused(capsys, tmp_path, STAGE2, '--root', blocker, '--weights', tmp_path / 'nowhere',
                   match=f'{blocker} is a file')


def test_retraining_is_keyed_on_the_labelled_images_content(tmp_path):
    paths = [tmp_path / f'{n}.jpg' for n in range(2)]
    for path in paths:
        path.write_bytes(b'image')
    samples = TrainingSamples(np.arange(2), paths, np.array([0, 1], np.float32))
    before = samples.fingerprint()
    paths[1].write_bytes(b'other image')
    assert samples.fingerprint() != before


# --- stage 3 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def detector():
    return FaceDetector()


def parse_with_stand_in(layout, detector, settings=STAND_IN_SETTINGS, folder=None):
    inputs = list_input_images(folder or layout.filtered_dir)
    work = plan_work(layout, inputs, settings)
    summary = run_stage(layout, StandInParser(), detector, work.pending, 2, torch.device('cpu'), progress=False,
                        present={n for n, _ in inputs.images}, record=StageRecord(layout, settings, work.inputs, {}))
    return work, summary


def test_stage3_skips_tiny_images_and_redoes_changed_ones(tmp_path, detector, reference_dir):
    ref_dir = reference_dir / 'facexformer'
    layout = Layout(tmp_path)
    folder = layout.filtered_dir
    folder.mkdir(parents=True)
    drawn_on_canvas(ref_dir).save(folder / '000003.jpg', quality=95)
    Image.new('RGB', (5, 5), (90, 60, 40)).save(folder / '000004.jpg')
    Image.new('RGB', (40, 12), (90, 60, 40)).save(folder / '000005.png')
    Image.new('RGB', (64, 64), (90, 60, 40)).save(folder / '000006.jpg')
    work, summary = parse_with_stand_in(layout, detector)
    assert summary.parsed == 1 and len(work.pending) == 4
    skipped = pd.read_csv(layout.segmentation_skipped_csv).set_index('img_no')['reason'].to_dict()
    assert skipped == {4: 'image of 5x5 pixels is too small for face detection (at least 20x20)',
                       5: 'image of 40x12 pixels is too small for face detection (at least 20x20)', 6: NO_FACE}

    # A rerun redoes nothing; a replaced image (same name, new bytes) and only it is parsed again.
    again = plan_work(layout, list_input_images(folder), STAND_IN_SETTINGS)
    assert again.pending == [] and again.finished == 1 and sorted(again.settled_skips) == [4, 5, 6]
    drawn_on_canvas(ref_dir).save(folder / '000006.jpg', quality=95)
    crop = layout.face_crop(3).read_bytes()
    work, summary = parse_with_stand_in(layout, detector)
    assert [n for n, _ in work.pending] == [6] and work.changed == 1 and summary.parsed == 1
    assert layout.face_crop(6).read_bytes() == crop and layout.face_crop(3).read_bytes() == crop
    record = json.loads(layout.segmentation_meta.read_text())
    assert record['inputs']['000006']['source'] == 'stylegan/synthesize_results_filtered/000006.jpg'
    # Other weights: every image is parsed again.
    assert len(plan_work(layout, list_input_images(folder), {'weights_sha256': 'other'}).pending) == 4


def test_stage3_odd_roots_and_empty_inputs_are_one_line(tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (64, 64)).save(images / '000001.jpg')
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    # --root under a regular file: refused before the weights are fetched (the missing file is never named).
    assert_refused(capsys, tmp_path, STAGE3, '--root', blocker, '--images', images,
                   '--weights', tmp_path / 'missing.pt', match=f'cannot write into {blocker}/segmentation')

    layout = Layout(tmp_path / 'root')
    layout.filtered_dir.mkdir(parents=True)
    atomic.write_csv(layout.cnn_merged_csv, pd.DataFrame({'img_no': [0, 1, 2], 'gender_score': [0.1] * 3}))
    assert_refused(capsys, layout.root, STAGE3, '--root', layout.root,
                   match='stage 2 ran but kept none of 3 images (see')
    layout.segmentation_dir.mkdir(parents=True)
    shutil.copy(images / '000001.jpg', layout.filtered_image(1))
    layout.parsing_map(1).mkdir()  # a folder under a result's name
    assert_refused(capsys, layout.root, STAGE3, '--root', layout.root, '--weights', tmp_path / 'missing.pt',
                   match='parsing_000001.png is a folder, not a stage-3 result file')


# --- stage 4 -----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fixtures(reference_dir):
    return reference_dir / 'ohlora' / 'property_scores' / 'fixtures'


def test_stage4_refuses_the_other_algorithms_stats(tmp_path, fixtures, capsys):
    layout = make_root(tmp_path, fixtures, range(8))
    assert run_script(STAGE4, '--root', tmp_path, '--algorithm', 1, '--no-progress', '--workers', 1) == 0
    stats1 = layout.property_scores_stats(1)
    base = ['--root', tmp_path, '--no-progress', '--workers', 1, '--algorithm', 2]
    assert_refused(capsys, tmp_path, STAGE4, *base, '--stats', stats1,
                   match='all_scores_stats.json holds algorithm-1 statistics, but this run uses --algorithm 2')
    document = json.loads(stats1.read_text())
    for change, message in [(lambda d: d.pop('algorithm'), 'does not say which algorithm'),
                            (lambda d: d['columns'].update(extra_score=d['columns']['eyes_score']), 'extra_score'),
                            (lambda d: d.update(score_columns=['eyes_score']), 'other columns')]:
        edited = json.loads(json.dumps(document))
        change(edited)
        (tmp_path / 'edited.json').write_text(json.dumps(edited))
        assert_refused(capsys, tmp_path, STAGE4, *base[:-1], 1, '--stats', tmp_path / 'edited.json', match=message)
    assert run_script(STAGE4, *base[:-1], 1, '--stats', stats1) == 0  # its own algorithm's file is fine


def test_stage4_odd_roots_and_stage3_outcomes_are_one_line(tmp_path, fixtures, capsys):
    layout = make_root(tmp_path, fixtures, range(4))
    layout.property_scores_dir.parent.mkdir(parents=True, exist_ok=True)
    layout.property_scores_dir.write_text('a file where the output folder goes')
    assert_refused(capsys, tmp_path, STAGE4, '--root', tmp_path, '--no-progress',
                   match=f'cannot write into {layout.property_scores_dir}: it is a file')

    parsed_none = Layout(tmp_path / 'none')
    parsed_none.segmentation_dir.mkdir(parents=True)
    atomic.write_csv(parsed_none.segmentation_skipped_csv, pd.DataFrame({'img_no': [1, 2], 'reason': [NO_FACE] * 2}))
    assert_refused(capsys, parsed_none.root, STAGE4, '--root', parsed_none.root, '--no-progress',
                   match='stage 3 parsed no face: it skipped all 2 images, see')


def test_stage4_uses_the_images_stage3_parsed(tmp_path, fixtures):
    """After stage 3 with --images DIR, img_path and algorithm 1's colours come from DIR, not the filtered folder."""
    reference = make_root(tmp_path / 'reference', fixtures, range(6))
    property_scores.compute_property_scores(reference, 1, progress=False)

    layout = make_root(tmp_path / 'root', fixtures, range(6))
    elsewhere = tmp_path / 'elsewhere'
    shutil.move(layout.filtered_dir, elsewhere)
    record = StageRecord(layout, STAND_IN_SETTINGS, {}, {'images_dir': layout.path_from_root(elsewhere)})
    for n in range(6):
        record.add(n, elsewhere / f'{n:06d}.jpg', 'digest')
    record.save()
    property_scores.compute_property_scores(layout, 1, progress=False)
    ours = pd.read_csv(layout.property_scores_csv(1))
    assert ours['img_path'].tolist() == [f'../elsewhere/{n:06d}.jpg' for n in range(6)]
    theirs = pd.read_csv(reference.property_scores_csv(1))
    assert ours[list(SCORE_COLUMNS)].equals(theirs[list(SCORE_COLUMNS)])
    assert all((layout.root / path).is_file() for path in ours['img_path'])
    with pytest.raises(PipelineError, match=r'elsewhere/000002.jpg: no such file'):
        (elsewhere / '000002.jpg').unlink()
        property_scores.compute_property_scores(layout, 1, progress=False, force=True)


def test_stage4_reruns_write_nothing_and_touching_is_not_changing(tmp_path, fixtures):
    layout = make_root(tmp_path, fixtures, range(6))
    property_scores.compute_property_scores(layout, 2, progress=False)
    before = snapshot(layout.property_scores_dir)
    stamps = [p.stat().st_mtime_ns for p in layout.property_scores_dir.iterdir()]
    for n in range(6):
        layout.parsing_map(n).touch()
    again = property_scores.compute_property_scores(layout, 2, progress=False)
    assert again.up_to_date and again.reused == 6 and again.scored == 0
    assert snapshot(layout.property_scores_dir) == before
    assert [p.stat().st_mtime_ns for p in layout.property_scores_dir.iterdir()] == stamps
