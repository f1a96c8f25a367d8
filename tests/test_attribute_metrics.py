"""Attribute metrics: Pearson r (zero variance -> 0), MAE, MSE, the pass rules, the best z, the label grid, summaries."""
import math
import warnings

import numpy as np
import pytest

from ohlora.constants import PROPERTY_NAMES
from stylegan_modified.attribute_metrics import (CONTROLLED_ATTRIBUTES, SCORE_DECIMALS, STRICT_RULE, UPSTREAM_V3_RULE,
                                                 V3_TEST_GRID, AttributeMetrics, Threshold, best_passing, compare,
                                                 grid_labels, mean_absolute_error, mean_squared_error, pearson_r,
                                                 summary_stats)


@pytest.mark.parametrize('x, y, expected', [
    ([1, 2, 3, 4], [2, 4, 6, 8], 1.0),
    ([1, 2, 3, 4], [8, 6, 4, 2], -1.0),
    ([1, 2, 3], [1, 3, 2], 0.5),             # dx = (-1, 0, 1), dy = (-1, 1, 0): 1 / sqrt(2 * 2)
    ([0, 0, 1, 1], [0, 1, 0, 1], 0.0),       # ties on both sides, uncorrelated: a true 0, not the zero-variance rule
    ([1, 1, 2], [1, 1, 3], 1.0),             # ties, y = 2x - 1
    ([1, 2, 3, 4], [1, 1, 1, 2], 0.7745966692414834),  # dy = (-1,-1,-1,3)/4: 3 / sqrt(5 * 3)
])
def test_pearson_r_by_hand(x, y, expected):
    assert pearson_r(x, y) == pytest.approx(expected, abs=1e-15)
    assert pearson_r(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson_r(y, x) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize('x, y', [
    ([0.1, 0.1, 0.1], [1, 2, 4]),   # the float mean of 0.1s is not exactly 0.1: deviations are ~1e-17, not 0
    ([1, 2, 3], [5, 5, 5]),
    ([2, 2], [2, 2]),
    ([7], [3]),                     # one sample
])
def test_zero_variance_gives_zero_not_nan(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no RuntimeWarning either
        assert pearson_r(x, y) == 0.0
    with np.errstate(all='ignore'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        numpy_r = np.corrcoef(x, y)[0, 1]
    assert math.isnan(numpy_r) or abs(numpy_r) < 1e-12  # numpy: no answer, or round-off of the rounded mean


def test_pearson_r_batched_over_many_z_equals_corrcoef_row_by_row():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.7 * x + rng.normal(size=(200, 50))       # (Z, n), x broadcast over z
    y[17] = 3.25                                    # a z whose measured scores never move
    y[18] = np.round(y[18], 0)                      # many ties
    r = pearson_r(x, y)
    assert r.shape == (200,)
    expected = [np.corrcoef(x, row)[0, 1] if np.ptp(row) > 0 else 0.0 for row in y]
    np.testing.assert_allclose(r, expected, atol=1e-12, rtol=0)
    assert r[17] == 0.0
    # the same along another axis
    np.testing.assert_allclose(pearson_r(x[:, None], y.T, axis=0), r, atol=1e-15, rtol=0)


def test_non_finite_inputs_give_nan_and_empty_input_raises():
    assert math.isnan(pearson_r([1, 2, np.nan], [1, 2, 3]))
    with pytest.raises(ValueError, match='at least one sample'):
        pearson_r([], [])


def test_mae_and_mse_by_hand():
    intended, measured = [1, 2, 3], [1.5, 2, 2]
    assert mean_absolute_error(intended, measured) == pytest.approx(0.5)       # (0.5 + 0 + 1) / 3
    assert mean_squared_error(intended, measured) == pytest.approx(1.25 / 3)   # (0.25 + 0 + 1) / 3
    batched = mean_absolute_error([1, 2, 3], [[1, 2, 3], [2, 3, 4]])
    np.testing.assert_array_equal(batched, [0.0, 1.0])


def test_v3_label_grid_is_upstreams_fifty_labels():
    labels = grid_labels()
    assert labels.shape == (50, 7) and labels.dtype == np.float32
    eyes, mouth, pose = (PROPERTY_NAMES.index(a) for a in ('eyes', 'mouth', 'pose'))
    others = [i for i in range(7) if i not in (eyes, mouth, pose)]
    assert not labels[:, others].any()
    # nested mouth (outer) -> eyes -> pose (inner)
    assert labels[0, [eyes, mouth, pose]].tolist() == pytest.approx([-1.8, -1.2, -1.2])
    assert labels[1, [eyes, mouth, pose]].tolist() == pytest.approx([-1.8, -1.2, 0.0])
    assert labels[5, [eyes, mouth, pose]].tolist() == pytest.approx([1.8, -1.2, -1.2])
    assert labels[10, [eyes, mouth, pose]].tolist() == pytest.approx([-1.8, -0.6, -1.2])
    assert labels[49, [eyes, mouth, pose]].tolist() == pytest.approx([1.8, 1.6, 3.6])
    assert sorted(set(labels[:, mouth].round(4))) == pytest.approx(sorted(V3_TEST_GRID['mouth']))
    checkpoint_test = grid_labels({'eyes': (-1.8, -0.9, 0.0, 0.9, 1.8)})
    assert checkpoint_test.shape == (5, 7) and checkpoint_test[:, eyes].tolist() == pytest.approx(
        [-1.8, -0.9, 0.0, 0.9, 1.8])
    for bad in ({'smile': (1.0,)}, {'eyes': ()}, {'eyes': (float('nan'),)}):
        with pytest.raises(ValueError):
            grid_labels(bad)


def constructed_case():
    """Four z against the 50 v3 labels, each built to show one rule: the scores are the labels, then edited."""
    labels = grid_labels().astype(np.float64)
    eyes = PROPERTY_NAMES.index('eyes')
    measured = np.repeat(labels[None], 4, axis=0)
    measured[:, :, 1] = np.linspace(-1, 1, 50)    # unsupervised columns: ignored
    measured[1, :, eyes] = 0.25                    # z1: eyes never move -> r 0, not NaN
    measured[2, :, eyes] += 1.1                    # z2: perfect r, eyes MAE 1.1 > 1.0
    measured[3, :, eyes] *= -1                     # z3: eyes inverted, r -1, MAE 1.8
    return labels, measured


def test_compare_on_a_constructed_case():
    labels, measured = constructed_case()
    metrics = compare(labels, measured)
    assert metrics.attributes == CONTROLLED_ATTRIBUTES and metrics.r.shape == metrics.mae.shape == (4, 3)
    np.testing.assert_allclose(metrics.get('r', 'eyes'), [1.0, 0.0, 1.0, -1.0], atol=1e-12)
    # eyes are +-1.8 in equal numbers: |1.8 - 0.25| and |-1.8 - 0.25| average to 1.8; inverted: |2 * 1.8| = 3.6
    np.testing.assert_allclose(metrics.get('mae', 'eyes'), [0.0, 1.8, 1.1, 3.6], atol=1e-6)
    np.testing.assert_allclose(metrics.get('mse', 'eyes'), [0.0, (1.55 ** 2 + 2.05 ** 2) / 2, 1.21, 12.96], atol=1e-5)
    np.testing.assert_allclose(metrics.r[:, 1:], 1.0, atol=1e-12)   # mouth and pose untouched
    np.testing.assert_allclose(metrics.mae[:, 1:], 0.0, atol=1e-12)
    np.testing.assert_array_equal(UPSTREAM_V3_RULE.passes(metrics), [True, False, False, False])
    np.testing.assert_array_equal(STRICT_RULE.passes(metrics), [True, False, True, True])  # |r|, no MAE
    checks = UPSTREAM_V3_RULE.checks(metrics)
    np.testing.assert_array_equal(checks['eyes'], [True, False, False, False])
    np.testing.assert_array_equal(checks['mouth'], [True] * 4)
    # one z alone, and a 3-column input instead of all seven properties
    single = compare(labels[:, [0, 3, 4]], measured[0][:, [0, 3, 4]])
    assert single.r.shape == (3,) and bool(UPSTREAM_V3_RULE.passes(single))


def test_scores_are_rounded_like_upstream_when_asked():
    intended = np.array([[0.0], [1.0]])
    measured = np.array([[0.000049], [1.23456]])
    assert compare(intended, measured, ['pose']).mae[0] == pytest.approx((0.000049 + 0.23456) / 2)
    assert compare(intended, measured, ['pose'], decimals=SCORE_DECIMALS).mae[0] == pytest.approx(0.2346 / 2)


def metrics_of(r, mae):
    r, mae = np.atleast_2d(np.asarray(r, float)), np.atleast_2d(np.asarray(mae, float))
    return AttributeMetrics(CONTROLLED_ATTRIBUTES, r, mae, mae ** 2)


def test_thresholds_are_inclusive_and_nan_fails():
    at = metrics_of([[0.77, 0.85, 0.82]], [[1.0, 0.6, 1.4]])
    assert UPSTREAM_V3_RULE.passes(at).tolist() == [True]
    for column in range(3):
        r, mae = at.r.copy(), at.mae.copy()
        r[0, column] = np.nextafter(r[0, column], 0)
        assert UPSTREAM_V3_RULE.passes(metrics_of(r, at.mae)).tolist() == [False]
        mae[0, column] = np.nextafter(mae[0, column], 9)
        assert UPSTREAM_V3_RULE.passes(metrics_of(at.r, mae)).tolist() == [False]
    assert STRICT_RULE.passes(metrics_of([[-0.92, 0.88, -0.88]], [[9, 9, 9]])).tolist() == [True]
    assert STRICT_RULE.passes(metrics_of([[0.9199, 0.88, 0.88]], [[0, 0, 0]])).tolist() == [False]
    assert UPSTREAM_V3_RULE.passes(metrics_of([[np.nan, 1, 1]], [[0, 0, 0]])).tolist() == [False]
    with pytest.raises(ValueError, match='needs metrics of pose'):
        UPSTREAM_V3_RULE.passes(AttributeMetrics(('eyes', 'mouth'), np.ones((1, 2)), np.zeros((1, 2)),
                                                 np.zeros((1, 2))))


def test_thresholds_can_be_overridden_without_changing_the_defaults():
    looser = UPSTREAM_V3_RULE.with_thresholds(min_r={'eyes': 0.5}, max_mae={'pose': None})
    assert looser.thresholds['eyes'] == Threshold(0.5, 1.0) and looser.thresholds['pose'] == Threshold(0.82, None)
    assert UPSTREAM_V3_RULE.thresholds['eyes'] == Threshold(0.77, 1.0)
    case = metrics_of([[0.6, 0.9, 0.9]], [[0.5, 0.5, 5.0]])
    assert not UPSTREAM_V3_RULE.passes(case)[0] and looser.passes(case)[0]
    wider = UPSTREAM_V3_RULE.with_thresholds(min_r={'hair_color': 0.5})
    assert list(wider.thresholds) == ['eyes', 'mouth', 'pose', 'hair_color']
    with pytest.raises(TypeError):
        UPSTREAM_V3_RULE.thresholds['eyes'] = Threshold(0.0)  # the shared rule is read-only
    with pytest.raises(ValueError, match='no r threshold'):
        UPSTREAM_V3_RULE.with_thresholds(max_mae={'hair_color': 1.0})
    with pytest.raises(ValueError, match='unknown attribute'):
        UPSTREAM_V3_RULE.with_thresholds(min_r={'smile': 0.5})
    with pytest.raises(ValueError, match='finite'):
        UPSTREAM_V3_RULE.with_thresholds(min_r={'eyes': float('nan')})


def test_best_passing_z_breaks_ties_by_summed_mae_then_index():
    r = [[0.90, 0.90, 0.90],    # mean 0.9
         [0.95, 0.95, 0.95],    # mean 0.95, MAE sum 2.0
         [0.95, 0.95, 0.95],    # mean 0.95, MAE sum 1.5  <- best
         [0.99, 0.99, 0.99],    # best r but does not pass
         [0.95, 0.95, 0.95]]    # same as row 2: the lower index wins
    mae = [[0.1, 0.1, 0.1], [1.0, 0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0.5, 0.5]]
    metrics = metrics_of(r, mae)
    assert best_passing(metrics, [True, True, True, False, True]) == 2
    assert best_passing(metrics, [True, True, False, False, True]) == 4
    assert best_passing(metrics, [True, False, False, False, False]) == 0
    assert best_passing(metrics, [False] * 5) is None
    with pytest.raises(ValueError):
        best_passing(metrics, [True, False])


def test_summary_stats_by_hand():
    stats = summary_stats(np.arange(1, 11))
    assert stats == {'mean': 5.5, 'median': 5.5, 'p10': pytest.approx(1.9), 'p90': pytest.approx(9.1), 'count': 10}
    per_column = summary_stats([[1, 10], [2, 20], [3, 30]], axis=0)
    np.testing.assert_allclose(per_column['median'], [2, 20])
    np.testing.assert_allclose(per_column['p10'], [1.2, 12])
    labels, measured = constructed_case()
    summary = compare(labels, measured).summary()
    assert summary['eyes']['r']['median'] == pytest.approx(0.5) and summary['eyes']['r']['count'] == 4
    assert summary['mouth']['mae']['mean'] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        summary_stats([])
