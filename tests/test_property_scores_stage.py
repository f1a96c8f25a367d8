"""Stage 4 as a whole: the script's files, resuming, --stats, parallel scoring and bad input."""
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ohlora.cli import run as run_cli
from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from segmentation import property_scores
from script_runner import script_main
from segmentation.score_normalization import read_raw_scores

ALL_CASES = list(range(37))
SCRIPT = 'compute_property_scores.py'


def make_root(root: Path, fixtures: Path, cases) -> Layout:
    """A root laid out as stages 2-3 leave it: filtered originals and the parsing results."""
    layout = Layout(root)
    layout.segmentation_dir.mkdir(parents=True, exist_ok=True)
    layout.filtered_dir.mkdir(parents=True, exist_ok=True)
    for n in cases:
        shutil.copy(fixtures / f'parsing_{n:06d}.png', layout.parsing_map(n))
        shutil.copy(fixtures / f'face_{n:06d}.png', layout.face_crop(n))
        shutil.copy(fixtures / f'{n:06d}.jpg', layout.filtered_image(n))
    return layout


def ok_cases(property_scores_dir, algorithm):
    raw = pd.read_csv(property_scores_dir / f'scores_alg{algorithm}_raw.csv', dtype=str)
    return [int(n) for n in raw.loc[raw.status == 'ok', 'img_no']]


@pytest.mark.parametrize('algorithm', [1, 2])
def test_stage_writes_raw_normalised_and_stats(tmp_path, property_scores_dir, algorithm):
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', ALL_CASES)
    summary = property_scores.compute_property_scores(layout, algorithm, progress=False)
    assert (summary.images, summary.scored, summary.reused) == (37, 37, 0)
    expected_guards = ({'hair_color_no_hair': [20, 25], 'hair_length_no_hair': [20, 25],
                        'pose_degenerate_nose': [21, 25, 35]} if algorithm == 1 else {'pose_equal_eye_x': [26]})
    assert summary.guard_hits == expected_guards

    raw = read_raw_scores(layout.property_scores_raw_csv(algorithm))
    assert list(raw.columns) == ['img_no', *SCORE_COLUMNS] and raw['img_no'].tolist() == ALL_CASES
    reference = pd.read_csv(property_scores_dir / f'scores_alg{algorithm}_raw.csv', dtype=str).set_index('img_no')
    for n in ok_cases(property_scores_dir, algorithm):
        ours = raw.loc[raw.img_no == n, list(SCORE_COLUMNS)].to_numpy()[0]
        upstream = reference.loc[str(n), list(SCORE_COLUMNS)].astype(float).to_numpy()
        assert np.abs(ours - upstream).max() <= 1e-9

    normalised = pd.read_csv(layout.property_scores_csv(algorithm))
    assert list(normalised.columns) == ['img_no', 'img_path', *SCORE_COLUMNS]
    assert normalised['img_path'][4] == 'stylegan/synthesize_results_filtered/000004.jpg'  # relative (R4)
    values = normalised[list(SCORE_COLUMNS)].to_numpy()
    assert np.isfinite(values).all()
    assert np.array_equal(values, np.round(values, 4))
    assert np.allclose(values.mean(axis=0), 0, atol=1e-3) and np.allclose(values.std(axis=0, ddof=1), 1, atol=1e-3)

    stats = json.loads(layout.property_scores_stats(algorithm).read_text())
    assert stats['algorithm'] == algorithm and stats['std_ddof'] == 1 and stats['images'] == 37
    assert stats['guarded_images'] == expected_guards
    for column in SCORE_COLUMNS:
        entry = stats['columns'][column]
        assert entry['n'] == 37
        assert entry['mean'] == pytest.approx(raw[column].mean(), rel=1e-12)
        assert entry['std'] == pytest.approx(raw[column].std(ddof=1), rel=1e-12)
        assert (entry['min'], entry['max']) == (normalised[column].min(), normalised[column].max())
    assert str(tmp_path) not in layout.property_scores_csv(algorithm).read_text()


@pytest.mark.parametrize('algorithm', [1, 2])
def test_stage_normalisation_matches_upstream_on_completed_rows(tmp_path, property_scores_dir, algorithm):
    cases = ok_cases(property_scores_dir, algorithm)
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', cases)
    property_scores.compute_property_scores(layout, algorithm, progress=False)
    ours = pd.read_csv(layout.property_scores_csv(algorithm))
    upstream = pd.read_csv(property_scores_dir / f'scores_alg{algorithm}_norm.csv')
    assert ours['img_no'].tolist() == upstream['img_no'].tolist()
    assert np.abs(ours[list(SCORE_COLUMNS)].to_numpy() - upstream[list(SCORE_COLUMNS)].to_numpy()).max() <= 1e-4


def test_rerun_skips_then_rescores_only_changed_images(tmp_path, property_scores_dir):
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', range(12))
    property_scores.compute_property_scores(layout, 2, progress=False)
    outputs = [layout.property_scores_raw_csv(2), layout.property_scores_csv(2), layout.property_scores_stats(2)]
    before = [p.read_bytes() for p in outputs]
    stamps = [p.stat().st_mtime_ns for p in outputs]

    again = property_scores.compute_property_scores(layout, 2, progress=False)
    assert again.up_to_date and again.scored == 0
    assert [p.stat().st_mtime_ns for p in outputs] == stamps

    later = outputs[0].stat().st_mtime + 10
    os.utime(layout.parsing_map(3), (later, later))      # touched, same bytes: its scores stand (content keys)
    fixtures = property_scores_dir / 'fixtures'
    for root in (layout, make_root(tmp_path / 'fresh', fixtures, [*range(12), 30])):
        shutil.copy(fixtures / 'parsing_000031.png', root.parsing_map(5))  # stage 3 rewrote image 5: other bytes
        shutil.copy(fixtures / 'face_000031.png', root.face_crop(5))
    shutil.copy(fixtures / 'parsing_000030.png', layout.parsing_map(30))
    shutil.copy(fixtures / 'face_000030.png', layout.face_crop(30))
    resumed = property_scores.compute_property_scores(layout, 2, progress=False)
    assert (resumed.images, resumed.scored, resumed.reused) == (13, 2, 11)
    fresh = property_scores.compute_property_scores(Layout(tmp_path / 'fresh'), 2, force=True, progress=False)
    assert fresh.scored == 13
    assert layout.property_scores_csv(2).read_bytes() == \
        Layout(tmp_path / 'fresh').property_scores_csv(2).read_bytes()
    assert before[0] != outputs[0].read_bytes()


def test_stats_from_another_run_normalise_a_single_image(tmp_path, property_scores_dir):
    first = make_root(tmp_path / 'first', property_scores_dir / 'fixtures', range(20))
    property_scores.compute_property_scores(first, 2, progress=False)
    single = make_root(tmp_path / 'single', property_scores_dir / 'fixtures', [7])
    with pytest.raises(PipelineError, match='at least 2'):
        property_scores.compute_property_scores(single, 2, progress=False)
    assert not single.property_scores_dir.exists()  # nothing written on error

    summary = property_scores.compute_property_scores(single, 2, stats_file=first.property_scores_stats(2),
                                                      progress=False)
    assert summary.statistics_from == 'file all_scores_v2_stats.json'
    ours = pd.read_csv(single.property_scores_csv(2))
    theirs = pd.read_csv(first.property_scores_csv(2))
    assert ours[list(SCORE_COLUMNS)].to_numpy()[0].tolist() == \
        theirs.loc[theirs.img_no == 7, list(SCORE_COLUMNS)].to_numpy()[0].tolist()
    stats = json.loads(single.property_scores_stats(2).read_text())
    assert stats['columns']['eyes_score']['n'] == 20 and stats['statistics_from'] == 'file all_scores_v2_stats.json'


def test_process_pool_gives_the_same_scores(tmp_path, property_scores_dir, monkeypatch):
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', ALL_CASES)
    serial = property_scores.score_parsed_images(layout, 2, ALL_CASES, progress=False)
    monkeypatch.setattr(property_scores, 'MIN_IMAGES_PER_WORKER', 1)
    pooled = property_scores.score_parsed_images(layout, 2, ALL_CASES, workers=2, chunk_size=10, progress=False)
    assert pooled == serial


def test_script_runs_and_reports_bad_input_in_one_line(tmp_path, property_scores_dir, capsys):
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', [0, 1, 2, 3])
    main = script_main(SCRIPT)  # its --help is checked with every script's in test_infrastructure.py
    main(['--root', str(tmp_path), '--algorithm', '1', '--no-progress', '--workers', '1'])
    out = capsys.readouterr().out
    assert 'algorithm 1: 4 images (4 scored, 0 reused)' in out
    assert layout.property_scores_csv(1).is_file() and not layout.property_scores_csv(2).exists()

    def error_of(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err
        return err

    layout.face_crop(2).unlink()
    assert 'face_000002.png: no such file (the face crop' in error_of(['--root', str(tmp_path), '--no-progress'])
    assert not layout.property_scores_csv(2).exists()
    cv2.imwrite(str(layout.parsing_map(1)), np.full((224, 224), 12, np.uint8))
    assert 'holds class 12' in error_of(['--root', str(tmp_path), '--algorithm', '1', '--no-progress', '--force'])
    assert layout.property_scores_csv(1).is_file()  # the earlier outputs survive

    empty = tmp_path / 'empty'
    (empty / 'segmentation' / 'segmentation_results').mkdir(parents=True)
    assert 'holds no parsing_NNNNNN.png maps' in error_of(['--root', str(empty), '--no-progress'])
    assert 'no such folder' in error_of(['--root', str(tmp_path / 'nowhere'), '--no-progress'])


def test_missing_original_for_algorithm_1(tmp_path, property_scores_dir):
    layout = make_root(tmp_path, property_scores_dir / 'fixtures', [0, 1, 2])
    layout.filtered_image(1).unlink()
    with pytest.raises(PipelineError,
                       match=r'000001.jpg: no such file \(the original image, whose colours algorithm 1 reads, of'):
        property_scores.compute_property_scores(layout, 1, progress=False)
    # algorithm 2 does not need it
    assert property_scores.compute_property_scores(layout, 2, progress=False).images == 3
