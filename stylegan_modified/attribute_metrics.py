"""How well generated images carry the requested attributes: Pearson r, MAE and MSE between the requested and the
re-measured property scores, the pass rules, the v3 test label grid and summary statistics (PIPELINE.md §7.4, §11).

Array convention: samples on axis -2, attributes on axis -1, anything in front is a batch (e.g. one row per z):
``intended`` (n, A) and ``measured`` (Z, n, A) broadcast to per-z metrics of shape (Z, A). The last axis holds
either the attributes asked for or all seven properties in the standard order (``ohlora.layout.PROPERTY_NAMES``),
from which the attributes are picked.

Pearson r is 0.0 when the requested or the measured values of a series are all equal (zero variance), where
``np.corrcoef`` gives NaN; the field's tables need a number there. Only non-finite inputs give NaN, and a NaN
never passes a rule. All arithmetic is float64.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ohlora.constants import PROPERTY_NAMES

CONTROLLED_ATTRIBUTES = ('eyes', 'mouth', 'pose')  # the three attributes v3 trains and every test checks
SCORE_DECIMALS = 4  # upstream rounds the property-CNN scores before comparing them


def pearson_r(x, y, axis: int = -1) -> np.ndarray:
    """Pearson r of ``x`` and ``y`` (broadcast) along ``axis``; 0.0 where either side has zero variance."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if x.shape[axis] == 0:
        raise ValueError('Pearson r needs at least one sample')
    dx = x - x.mean(axis=axis, keepdims=True)
    dy = y - y.mean(axis=axis, keepdims=True)
    denominator = np.sqrt((dx * dx).sum(axis=axis)) * np.sqrt((dy * dy).sum(axis=axis))
    # All-equal values are tested exactly: their deviations from a rounded mean are tiny but not always zero.
    constant = (np.ptp(x, axis=axis) == 0) | (np.ptp(y, axis=axis) == 0) | (denominator == 0)
    with np.errstate(invalid='ignore', divide='ignore'):
        r = np.clip((dx * dy).sum(axis=axis) / denominator, -1.0, 1.0)
    return np.where(constant, 0.0, r)[()]


def mean_absolute_error(intended, measured, axis: int = -1) -> np.ndarray:
    return np.abs(np.asarray(intended, dtype=np.float64) - np.asarray(measured, dtype=np.float64)).mean(axis=axis)[()]


def mean_squared_error(intended, measured, axis: int = -1) -> np.ndarray:
    return np.square(np.asarray(intended, dtype=np.float64) - np.asarray(measured, dtype=np.float64)).mean(axis=axis)[()]


def attribute_columns(values, attributes: Sequence[str]) -> np.ndarray:
    """``values`` as float64 (..., A): a last axis of seven values is read as all properties in the standard order
    and narrowed to ``attributes``; one of ``len(attributes)`` values is taken as already in that order."""
    values = np.asarray(values, dtype=np.float64)
    unknown = [a for a in attributes if a not in PROPERTY_NAMES]
    if unknown:
        raise ValueError(f'unknown attribute(s) {", ".join(unknown)}; the properties are {", ".join(PROPERTY_NAMES)}')
    if values.ndim >= 1 and values.shape[-1] == len(PROPERTY_NAMES):
        return values[..., [PROPERTY_NAMES.index(a) for a in attributes]]
    if values.ndim >= 1 and values.shape[-1] == len(attributes):
        return values
    raise ValueError(f'the last axis has {values.shape[-1] if values.ndim else 0} values; expected '
                     f'{len(attributes)} ({", ".join(attributes)}) or all {len(PROPERTY_NAMES)} properties')


@dataclass(frozen=True)
class AttributeMetrics:
    """r, MAE and MSE per attribute: arrays of shape (..., A), the last axis in the order of ``attributes``."""
    attributes: tuple[str, ...]
    r: np.ndarray
    mae: np.ndarray
    mse: np.ndarray

    def get(self, metric: str, attribute: str) -> np.ndarray:
        """e.g. ``get('r', 'eyes')``: that attribute's values, shape (...)."""
        if metric not in ('r', 'mae', 'mse'):
            raise ValueError(f"metric must be 'r', 'mae' or 'mse', not {metric!r}")
        return getattr(self, metric)[..., self.attributes.index(attribute)]

    def summary(self, axis: int = 0) -> dict[str, dict[str, dict[str, float | np.ndarray]]]:
        """``{attribute: {metric: summary_stats}}`` over ``axis`` (e.g. over all z)."""
        return {a: {m: summary_stats(self.get(m, a), axis=axis) for m in ('r', 'mae', 'mse')}
                for a in self.attributes}


def compare(intended, measured, attributes: Sequence[str] = CONTROLLED_ATTRIBUTES,
            decimals: int | None = None) -> AttributeMetrics:
    """Metrics of ``measured`` against ``intended`` (see the module's array convention) per attribute.

    ``decimals``: round ``measured`` first (``SCORE_DECIMALS`` = 4 for upstream's rounded property-CNN scores).
    """
    attributes = tuple(attributes)
    intended, measured = attribute_columns(intended, attributes), attribute_columns(measured, attributes)
    if decimals is not None:
        measured = np.round(measured, decimals)
    if intended.ndim < 2 or measured.ndim < 2:
        raise ValueError('intended and measured need a sample axis (-2) and an attribute axis (-1)')
    intended, measured = np.broadcast_arrays(intended, measured)
    return AttributeMetrics(attributes, pearson_r(intended, measured, axis=-2),
                            mean_absolute_error(intended, measured, axis=-2),
                            mean_squared_error(intended, measured, axis=-2))


@dataclass(frozen=True)
class Threshold:
    """An attribute passes when r >= ``min_r`` (|r| under an ``absolute_r`` rule) and MAE <= ``max_mae``."""
    min_r: float
    max_mae: float | None = None  # None: no MAE condition


@dataclass(frozen=True)
class PassRule:
    name: str
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    absolute_r: bool = False  # the direction tests correlate an edit strength whose sign is arbitrary

    def __post_init__(self):  # shared module-level rules must not be changed in place by one caller
        object.__setattr__(self, 'thresholds', MappingProxyType(dict(self.thresholds)))

    def checks(self, metrics: AttributeMetrics) -> dict[str, np.ndarray]:
        """Per attribute of the rule: whether it passes, shape (...)."""
        missing = [a for a in self.thresholds if a not in metrics.attributes]
        if missing:
            raise ValueError(f'the {self.name} rule needs metrics of {", ".join(missing)}')
        result = {}
        for attribute, threshold in self.thresholds.items():
            r = metrics.get('r', attribute)
            ok = (np.abs(r) if self.absolute_r else r) >= threshold.min_r
            if threshold.max_mae is not None:
                ok = ok & (metrics.get('mae', attribute) <= threshold.max_mae)
            result[attribute] = np.asarray(ok)
        return result

    def passes(self, metrics: AttributeMetrics) -> np.ndarray:
        """Whether every attribute of the rule passes, shape (...) (e.g. one bool per z)."""
        checks = list(self.checks(metrics).values())
        return np.logical_and.reduce(checks) if checks else np.ones(metrics.r.shape[:-1], dtype=bool)

    def with_thresholds(self, min_r: Mapping[str, float] | None = None,
                        max_mae: Mapping[str, float | None] | None = None) -> PassRule:
        """A copy with some thresholds replaced (e.g. from command-line options); attributes may be added."""
        min_r, max_mae = dict(min_r or {}), dict(max_mae or {})
        bad = [f'{a}={v}' for a, v in [*min_r.items(), *max_mae.items()] if v is not None and not math.isfinite(v)]
        if bad:
            raise ValueError(f'thresholds must be finite numbers: {", ".join(bad)}')
        thresholds = dict(self.thresholds)
        for attribute in dict.fromkeys([*min_r, *max_mae]):
            if attribute not in PROPERTY_NAMES:
                raise ValueError(f'unknown attribute {attribute!r} in the {self.name} rule')
            old = thresholds.get(attribute)
            if old is None and attribute not in min_r:
                raise ValueError(f'{attribute} has no r threshold in the {self.name} rule; give one')
            thresholds[attribute] = Threshold(min_r.get(attribute, old.min_r if old else None),
                                              max_mae[attribute] if attribute in max_mae
                                              else (old.max_mae if old else None))
        return replace(self, thresholds=thresholds)


# The upstream v3 per-epoch test (README §4-4): signed r and MAE.
UPSTREAM_V3_RULE = PassRule('upstream v3', {'eyes': Threshold(0.77, 1.0), 'mouth': Threshold(0.85, 0.6),
                                            'pose': Threshold(0.82, 1.4)})
# The author's later attribute-direction test (DIRECTIONS.md): |r| only, no MAE.
STRICT_RULE = PassRule('strict', {'eyes': Threshold(0.92), 'mouth': Threshold(0.88), 'pose': Threshold(0.88)},
                       absolute_r=True)
PASS_RULES = {'upstream_v3': UPSTREAM_V3_RULE, 'strict': STRICT_RULE}


def best_passing(metrics: AttributeMetrics, passed, attributes: Sequence[str] = CONTROLLED_ATTRIBUTES) -> int | None:
    """Index of the best passing row of (Z, A) metrics: highest mean r over ``attributes``, ties broken by the lowest
    summed MAE, then by the lowest index; None when no row passes."""
    passed = np.asarray(passed, dtype=bool)
    if metrics.r.ndim != 2 or passed.shape != metrics.r.shape[:1]:
        raise ValueError(f'expected (Z, A) metrics and Z pass flags, not {metrics.r.shape} and {passed.shape}')
    candidates = np.flatnonzero(passed)
    if candidates.size == 0:
        return None
    mean_r = np.mean([metrics.get('r', a)[candidates] for a in attributes], axis=0)
    summed_mae = np.sum([metrics.get('mae', a)[candidates] for a in attributes], axis=0)
    order = np.lexsort((candidates, summed_mae, -mean_r))  # last key sorts first
    return int(candidates[order[0]])


# The v3 per-epoch test labels: loops nested in this order (mouth outer, pose inner), all other entries 0.
V3_TEST_GRID: dict[str, tuple[float, ...]] = {'mouth': (-1.2, -0.6, 0.0, 0.8, 1.6), 'eyes': (-1.8, 1.8),
                                              'pose': (-1.2, 0.0, 1.2, 2.4, 3.6)}


def grid_labels(grid: Mapping[str, Sequence[float]] = V3_TEST_GRID, dtype=np.float32) -> np.ndarray:
    """float32 labels (prod of the grid sizes, 7): every combination, the first attribute of ``grid`` varying
    slowest; attributes not in ``grid`` are 0. The default is upstream's 50 v3 test labels. ``dtype=np.float64``
    keeps the grid's values exactly (the requested side of a comparison: float32 1.8 is 1.79999995)."""
    unknown = [a for a in grid if a not in PROPERTY_NAMES]
    if unknown:
        raise ValueError(f'unknown attribute(s) {", ".join(unknown)} in the label grid')
    empty = [a for a, values in grid.items() if len(values) == 0]
    if empty:
        raise ValueError(f'the label grid has no values for {", ".join(empty)}')
    if not all(math.isfinite(v) for values in grid.values() for v in values):
        raise ValueError('the label grid has values that are not finite numbers')
    columns = [PROPERTY_NAMES.index(a) for a in grid]
    combinations = np.array(list(itertools.product(*grid.values())), dtype=np.float64).reshape(-1, len(columns))
    labels = np.zeros((len(combinations), len(PROPERTY_NAMES)), dtype=dtype)
    labels[:, columns] = combinations
    return labels


def summary_stats(values, axis: int | None = 0) -> dict[str, float | np.ndarray]:
    """mean, median, 10th and 90th percentile (linear interpolation) and the count along ``axis``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError('no values to summarise')
    p10, p90 = np.percentile(values, [10, 90], axis=axis)
    count = values.size if axis is None else values.shape[axis]
    return {'mean': values.mean(axis=axis)[()], 'median': np.median(values, axis=axis)[()],
            'p10': np.asarray(p10)[()], 'p90': np.asarray(p90)[()], 'count': int(count)}
