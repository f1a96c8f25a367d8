"""Stage 4 algorithms: raw scores equal to the upstream's on every fixture, guard values, normalisation, tie rule."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError
from segmentation import property_scores_alg1 as alg1
from segmentation import property_scores_alg2 as alg2
from segmentation.property_scores_common import background_mean_and_std, channel_sums, read_bgr, read_parsing_map
from segmentation.score_normalization import ColumnStats, compute_stats, normalise, normalise_with_stats, read_stats

# Scores the upstream returns as Python ints (or int-valued floats): compared exactly.
INTEGER_SCORES = {1: ('eyes_score', 'hair_length_score', 'mouth_score'), 2: ('hair_length_score',)}
FLOAT_TOLERANCE = 1e-9
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def computed(property_scores_dir):
    """Our raw scores of all 37 fixtures for both algorithms: {alg: {img_no: ImageScores}}."""
    fixtures = property_scores_dir / 'fixtures'
    result = {1: {}, 2: {}}
    for map_path in sorted(fixtures.glob('parsing_*.png')):
        n = int(map_path.stem.split('_')[1])
        parsing_map = read_parsing_map(map_path)
        result[1][n] = alg1.compute_scores(n, parsing_map, alg1.read_colour(fixtures / f'{n:06d}.jpg'))
        result[2][n] = alg2.compute_scores(n, parsing_map, read_bgr(fixtures / f'face_{n:06d}.png', 'face crop'))
    return result


def reference_raw(property_scores_dir, algorithm) -> pd.DataFrame:
    return pd.read_csv(property_scores_dir / f'scores_alg{algorithm}_raw.csv', dtype=str)


def upstream_value(token: str):
    """A reference cell as a float, or None where upstream raised or returned None/NaN/inf."""
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@pytest.mark.parametrize('algorithm', [1, 2])
def test_raw_scores_equal_upstream_on_every_completed_score(computed, property_scores_dir, algorithm):
    reference = reference_raw(property_scores_dir, algorithm)
    assert len(reference) == len(computed[algorithm]) == 37
    compared = 0
    for _, row in reference.iterrows():
        ours = computed[algorithm][int(row.img_no)].as_dict()
        for column in SCORE_COLUMNS:
            expected = upstream_value(row[column])
            if expected is None:
                continue
            if column in INTEGER_SCORES[algorithm]:
                assert ours[column] == expected, (row.img_no, column)
            else:
                assert abs(ours[column] - expected) <= FLOAT_TOLERANCE, (row.img_no, column, ours[column], expected)
            compared += 1
    assert compared == 37 * 7 - (7 if algorithm == 1 else 1)  # the cells where upstream fails


@pytest.mark.parametrize('algorithm', [1, 2])
def test_guard_values_replace_every_upstream_failure_and_are_named(computed, property_scores_dir, algorithm):
    guard_value = {1: {'hair_color_score': (127.5, alg1.GUARD_HAIR_COLOR),
                       'hair_length_score': (0.0, alg1.GUARD_HAIR_LENGTH),
                       'pose_score': (0.0, alg1.GUARD_POSE)},
                   2: {'pose_score': (0.0, alg2.GUARD_POSE)}}[algorithm]
    expected_guards = {}
    for _, row in reference_raw(property_scores_dir, algorithm).iterrows():
        n = int(row.img_no)
        ours = computed[algorithm][n]
        failing = [c for c in SCORE_COLUMNS if upstream_value(row[c]) is None]
        assert (row.status == 'ok') == (not failing)
        for column in failing:
            value, guard = guard_value[column]
            assert ours.as_dict()[column] == value
            expected_guards.setdefault(n, set()).add(guard)
        assert set(ours.guards) == expected_guards.get(n, set()), n
        assert all(math.isfinite(v) for v in ours.values)
    if algorithm == 1:
        assert expected_guards == {20: {'hair_color_no_hair', 'hair_length_no_hair'}, 21: {'pose_degenerate_nose'},
                                   25: {'hair_color_no_hair', 'hair_length_no_hair', 'pose_degenerate_nose'},
                                   35: {'pose_degenerate_nose'}}
    else:
        assert expected_guards == {26: {'pose_equal_eye_x'}}


def test_documented_edge_cases(computed):
    a1, a2 = computed[1], computed[2]
    assert a1[29].as_dict()['eyes_score'] == 3.5            # only rows 56-139 are scanned
    assert a1[34].as_dict()['eyes_score'] == 0.0            # eyes outside their search columns
    assert a1[27].as_dict()['hair_length_score'] == 233.0   # 223 + (10 + 10) / 2
    assert a1[28].as_dict()['hair_length_score'] == 232.5
    assert a2[30].as_dict()['eyes_score'] == pytest.approx(1.2, abs=1e-15)  # the diagonal pair wins the tie
    assert a2[27].as_dict()['hair_length_score'] == 168.0   # bottom row exactly 20: no extension
    assert a2[28].as_dict()['hair_length_score'] == 167.0
    assert a2[31].as_dict()['hair_color_score'] == 127.5    # one hair pixel: empty 10-90 % slice
    assert a2[25].values[:5] == (0.0, 127.5, 0.0, 0.0, 0.0)
    for scores in (a1, a2):
        assert scores[24].values[5:] == (192.0, 0.0)        # no top-half background
        assert scores[32].values[6] == 0.0 and scores[33].values[6] == 0.0


@pytest.mark.parametrize('algorithm', [1, 2])
def test_normalisation_matches_upstream_on_the_completed_rows(computed, property_scores_dir, algorithm):
    reference = reference_raw(property_scores_dir, algorithm)
    ok = [int(n) for n in reference.loc[reference.status == 'ok', 'img_no']]
    raw = pd.DataFrame([computed[algorithm][n].values for n in ok], columns=list(SCORE_COLUMNS))
    raw.insert(0, 'img_no', ok)
    normalised, stats = normalise(raw)
    expected = pd.read_csv(property_scores_dir / f'scores_alg{algorithm}_norm.csv')
    assert expected['img_no'].tolist() == ok
    difference = np.abs(normalised[list(SCORE_COLUMNS)].to_numpy() - expected[list(SCORE_COLUMNS)].to_numpy())
    assert difference.max() <= 1e-4 + 1e-12
    detail = pd.read_json(property_scores_dir / 'scores_detail.json', typ='series')['normalisation'][f'alg{algorithm}']
    for column in SCORE_COLUMNS:
        assert stats[column].n == len(ok)
        assert stats[column].mean == pytest.approx(detail['column_stats_before'][column]['mean'], rel=1e-12)
        assert stats[column].std == pytest.approx(detail['column_stats_before'][column]['std_ddof1'], rel=1e-12)


def test_normalisation_uses_sample_std_and_python_round():
    raw = pd.DataFrame({c: [100.0, 250.0, 120.0, 180.0, 210.0] for c in SCORE_COLUMNS})
    normalised, stats = normalise(raw)
    # The seed's example with ddof = 1 (the code's rule, §6.6), rounded to 4 decimals.
    assert normalised['eyes_score'].tolist() == [-1.1574, 1.2538, -0.8359, 0.1286, 0.6108]
    assert stats['eyes_score'] == ColumnStats(172.0, float(np.std([100, 250, 120, 180, 210], ddof=1)), 5)
    # Python round() rounds the exact binary value; np.round (via x * 1e4) gives 1.2346 here.
    halfway = pd.DataFrame({c: [1.23465] for c in SCORE_COLUMNS})
    assert normalise_with_stats(halfway, {c: ColumnStats(0.0, 1.0, 2) for c in SCORE_COLUMNS}).iloc[0, 0] == 1.2347


def test_normalisation_refuses_one_row_or_a_constant_column():
    one = pd.DataFrame({c: [1.0] for c in SCORE_COLUMNS})
    with pytest.raises(PipelineError, match='at least 2.*--stats'):
        compute_stats(one)
    constant = pd.DataFrame({c: [1.0, 2.0, 3.0] for c in SCORE_COLUMNS})
    constant['mouth_score'] = 0.25
    with pytest.raises(PipelineError, match='mouth_score has the same value'):
        compute_stats(constant)


def test_read_stats_rejects_bad_files(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"columns": {"eyes_score": {"mean": 1, "std": 0, "n": 3}}}')
    with pytest.raises(PipelineError, match='eyes_score'):
        read_stats(bad)
    bad.write_text('not json')
    with pytest.raises(PipelineError, match='not a property-score statistics file'):
        read_stats(bad)
    with pytest.raises(PipelineError, match='no such statistics file'):
        read_stats(tmp_path / 'missing.json')


# ---------------------------------------------------------------------------------------------------------------
# The farthest pair over the column extremes against the upstream's O(n^2) scan.

def brute_force_cos(mask: np.ndarray) -> tuple[float, bool]:
    """(upstream's cos, whether farthest pairs with different cos tie) by the upstream's O(n^2) scan."""
    xs, ys = np.nonzero(mask.T)  # column-major: x outer, y inner
    best, pair = 0, None
    for i in range(len(xs)):
        d2 = (ys[i] - ys[:i]) ** 2 + (xs[i] - xs[:i]) ** 2
        if i and d2.max() > best:
            j = int(d2.argmax())          # first j reaching this row's maximum
            best, pair = int(d2[j]), (i, j)
    if pair is None:
        return 1.0, False
    i, j = pair
    d2 = (ys[:, None] - ys) ** 2 + (xs[:, None] - xs) ** 2
    tied_dx = {abs(int(xs[a] - xs[b])) for a, b in zip(*np.nonzero(d2 == best))}
    return abs(int(xs[i] - xs[j])) / math.sqrt(best), len(tied_dx) > 1


def random_eye_masks(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:112, :168]
    for k in range(count):
        kind = k % 4
        if kind == 0:    # tilted ellipse, as real eyes
            cy, cx, a, b, t = rng.uniform(20, 90), rng.uniform(20, 150), rng.uniform(1, 16), rng.uniform(0.5, 8), \
                rng.uniform(0, math.pi)
            u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
            v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
            yield (u / a) ** 2 + (v / b) ** 2 <= 1
        elif kind == 1:  # axis-aligned rectangle: many tied farthest pairs
            mask = np.zeros((112, 168), bool)
            y, x = rng.integers(0, 100), rng.integers(0, 150)
            mask[y:y + rng.integers(1, 12), x:x + rng.integers(1, 18)] = True
            yield mask
        elif kind == 2:  # points on a lattice circle (radius 5 or 25: 3-4-5 and 7-24-25 ties) around one pixel
            radius = (5, 25)[k % 8 == 2]
            ring = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                    if dy * dy + dx * dx == radius * radius]
            chosen = rng.choice(len(ring), size=rng.integers(2, len(ring) + 1), replace=False)
            mask = np.zeros((112, 168), bool)
            mask[50, 80] = True
            for c in chosen:
                mask[50 + ring[c][0], 80 + ring[c][1]] = True
            yield mask
        else:            # noisy blob
            yield (rng.random((112, 168)) < 0.3) & ((yy - 56) ** 2 / 100 + (xx - 84) ** 2 / 400 <= 1)


def test_farthest_pair_keeps_the_upstream_tie_rule():
    ties = 0
    for mask in random_eye_masks(160):
        expected, tied = brute_force_cos(mask)
        assert alg2.eye_shape(mask, 0).cos == expected
        ties += tied
    assert ties >= 20  # the masks really exercise the tie rule
    # Fixture 30's left eye: a horizontal pair and a 3-4-5 diagonal pair both at distance 5; the diagonal wins.
    mask = np.zeros((112, 168), bool)
    for y, x in [(100, 80), (102, 83), (103, 83), (104, 83), (100, 85)]:
        mask[y - 56, x] = True
    assert alg2.eye_shape(mask, 0).cos == 0.6


# ---------------------------------------------------------------------------------------------------------------
# Random maps against the per-pixel-loop baseline of bench/ (a different, literal implementation).

def load_loop_baseline():
    spec = importlib.util.spec_from_file_location('bench_property_scores', REPO / 'bench' / 'bench_property_scores.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_parsing_map(rng) -> np.ndarray:
    yy, xx = np.mgrid[:224, :224]
    parsing_map = np.zeros((224, 224), np.uint8)
    parsing_map[(yy - 120) ** 2 / 80 ** 2 + (xx - 112) ** 2 / 62 ** 2 <= 1] = 1
    hair_bottom = rng.integers(60, 224)
    parsing_map[(yy < hair_bottom) & (np.abs(xx - 112) > rng.integers(40, 70)) | (yy < rng.integers(20, 50))] = 10
    for cls, cx in ((4, rng.integers(60, 100)), (5, rng.integers(124, 164))):
        cy, a, b, t = rng.integers(90, 125), rng.uniform(3, 14), rng.uniform(1, 7), rng.uniform(-0.5, 0.5)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        parsing_map[(u / a) ** 2 + (v / b) ** 2 <= 1] = cls
    nose_tilt = rng.uniform(-1, 1)
    parsing_map[(np.abs(xx - 112 - nose_tilt * (yy - 135)) < 5) & (yy > 120) & (yy < 150)] = 6
    mouth_open = rng.integers(0, 10)
    parsing_map[(np.abs(xx - 112) < 18) & (yy >= 160) & (yy < 164)] = 7
    parsing_map[(np.abs(xx - 112) < 15) & (yy >= 164) & (yy < 164 + mouth_open)] = 8
    parsing_map[(np.abs(xx - 112) < 18) & (yy >= 164 + mouth_open) & (yy < 168 + mouth_open)] = 9
    noise = rng.random((224, 224)) < 0.01
    parsing_map[noise] = rng.integers(0, 11, int(noise.sum()))
    return parsing_map


def test_random_maps_agree_with_the_per_pixel_loop_baseline():
    loops = load_loop_baseline()
    rng = np.random.default_rng(7)
    for _ in range(4):
        parsing_map = random_parsing_map(rng)
        colour = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        for fast, slow in ((alg1.compute_scores, loops.loop_alg1), (alg2.compute_scores, loops.loop_alg2)):
            expected = slow(parsing_map.tolist(), colour.tolist())
            ours = fast(0, parsing_map, colour).values
            assert np.allclose(ours, expected, rtol=0, atol=1e-9), (ours, expected)


def test_background_special_cases():
    colour = np.full((224, 224, 3), 90, np.uint8)
    colour[0, 0] = (30, 60, 90)
    parsing_map = np.ones((224, 224), np.uint8)
    sums = channel_sums(colour)
    assert background_mean_and_std(parsing_map, sums) == (192.0, 0.0)
    parsing_map[0, 0] = 0
    assert background_mean_and_std(parsing_map, sums) == (60.0, 0.0)
    parsing_map[200, 5] = 0  # bottom half: not counted
    assert background_mean_and_std(parsing_map, sums) == (60.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad parsing maps.

def test_parsing_map_must_be_224_and_hold_classes_0_to_10(tmp_path):
    import cv2

    good = np.zeros((224, 224), np.uint8)
    cv2.imwrite(str(tmp_path / 'ok.png'), np.dstack([good + 3] * 3))
    assert read_parsing_map(tmp_path / 'ok.png').max() == 3  # a grey map saved as colour is accepted
    cv2.imwrite(str(tmp_path / 'small.png'), good[:200])
    with pytest.raises(PipelineError, match=r'224x200; a parsing map must be 224x224'):
        read_parsing_map(tmp_path / 'small.png')
    cv2.imwrite(str(tmp_path / 'class11.png'), good + 11)
    with pytest.raises(PipelineError, match='holds class 11'):
        read_parsing_map(tmp_path / 'class11.png')
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(PipelineError, match='not a readable image'):
        read_parsing_map(tmp_path / 'broken.png')
    colour = np.dstack([good, good + 1, good + 2])
    cv2.imwrite(str(tmp_path / 'colour.png'), colour)
    with pytest.raises(PipelineError, match='not a single-channel 8-bit class map'):
        read_parsing_map(tmp_path / 'colour.png')


def test_fast_pearson_and_median_equal_numpy_bit_for_bit():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(2, 400))
        xs, ys = rng.integers(0, 224, n), rng.integers(0, 224, n)
        if xs.min() == xs.max() or ys.min() == ys.max():
            continue
        assert alg1.pearson(xs, ys) == float(np.corrcoef(xs, ys)[0][1])
        mask = rng.random((224, 224)) < rng.uniform(0.0005, 0.3)
        sums = rng.integers(0, 766, (224, 224)).astype(np.uint16)
        if mask.any():
            assert alg1.hair_color_score(mask, sums) == float(np.median(sums[mask] / 3))
