"""The figures of an attribute-control evaluation, from the requested and the measured values (numpy only).

Inputs: ``requested`` (L, 7), the label grid; ``measured`` (Z, L, 7), the z-scores of every image of every z,
a row of NaN where nothing was measured (no face); optional per-image gender and quality ensemble scores and
identity scores (Z, L). Metrics come from :mod:`stylegan_modified.attribute_metrics`.

* per z and swept attribute: r (signed), |r|, MAE over the z's measured images; a z with fewer than two
  measured images is "unmeasured": it fails every rule and is left out of the r / MAE statistics;
* pass rules: each rule checks the attributes of its table that the grid sweeps;
* leakage: per z the least-squares slopes of every measured attribute on the swept requested ones (the grid
  is factorial, so each slope is that attribute's own regression); the diagonal is the gain (ideal 1), the
  rest is leakage (ideal 0); averaged over z;
* shares of images judged female (gender >= 0.7) and of good quality (>= 0.9); identity per z.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ohlora.layout import PROPERTY_NAMES
from stylegan_modified.attribute_metrics import (
    CONTROLLED_ATTRIBUTES, PASS_RULES, AttributeMetrics, PassRule, best_passing, compare, summary_stats)
from stylegan_modified.gender_quality_judge import SHARE_NAMES, THRESHOLDS

MIN_MEASURED = 2  # images a z needs for an r


def measured_rows(measured: np.ndarray) -> np.ndarray:
    """(Z, L) bool: which images were measured (every value finite)."""
    return np.isfinite(measured).all(axis=-1)


def per_z_metrics(requested: np.ndarray, measured: np.ndarray, attributes) -> AttributeMetrics:
    """r, MAE, MSE per z (Z, A) over the measured images of each z; vectorised when every image was measured."""
    attributes = tuple(attributes)
    valid = measured_rows(measured)
    if valid.all():
        return compare(requested, measured, attributes)
    shape = (measured.shape[0], len(attributes))
    r, mae, mse = np.zeros(shape), np.full(shape, np.nan), np.full(shape, np.nan)
    for z in np.flatnonzero(valid.any(axis=1)):
        rows = valid[z]
        metrics = compare(requested[rows], measured[z, rows], attributes)
        r[z], mae[z], mse[z] = metrics.r, metrics.mae, metrics.mse
    return AttributeMetrics(attributes, r, mae, mse)


def leakage_slopes(requested: np.ndarray, measured: np.ndarray, swept) -> np.ndarray:
    """(Z, A, 7): per z, d measured[m] / d requested[a] by least squares with an intercept; NaN where the z's
    measured images do not determine the slopes."""
    columns = [PROPERTY_NAMES.index(a) for a in swept]
    x = np.asarray(requested, dtype=np.float64)[:, columns]
    measured = np.asarray(measured, dtype=np.float64)
    valid = measured_rows(measured)
    slopes = np.full((measured.shape[0], len(columns), measured.shape[-1]), np.nan)
    if valid.all():
        centred = x - x.mean(axis=0)
        if np.linalg.matrix_rank(centred) == len(columns):
            y = measured - measured.mean(axis=1, keepdims=True)
            slopes[:] = np.einsum('al,zlm->zam', np.linalg.pinv(centred), y)
        return slopes
    for z in range(measured.shape[0]):
        rows = valid[z]
        if rows.sum() <= len(columns):
            continue
        xc = x[rows] - x[rows].mean(axis=0)
        if np.linalg.matrix_rank(xc) < len(columns):
            continue
        yc = measured[z, rows] - measured[z, rows].mean(axis=0)
        slopes[z] = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return slopes


def rule_for(rule: PassRule, swept) -> PassRule | None:
    """The rule narrowed to the attributes the grid sweeps; None when it checks none of them."""
    thresholds = {a: t for a, t in rule.thresholds.items() if a in swept}
    return PassRule(rule.name, thresholds, rule.absolute_r) if thresholds else None


def _stats(values: np.ndarray) -> dict | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    return {k: (float(v) if k != 'count' else int(v)) for k, v in summary_stats(values).items()}


def nan_reduce(function, values: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.nanmean`` / ``np.nanmedian`` over ``axis``: NaN, without a warning, where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return function(np.asarray(values, dtype=np.float64), axis=axis)


@dataclass
class EvaluationFigures:
    swept: tuple[str, ...]
    metrics: AttributeMetrics              # (Z, A) over the swept attributes
    measured_images: np.ndarray            # (Z,) images measured per z
    enough: np.ndarray                     # (Z,) bool: the z has an r
    passes: dict[str, np.ndarray | None]   # rule key -> (Z,) bool, None when the rule checks no swept attribute
    rules: dict[str, PassRule | None]
    slopes: np.ndarray                     # (Z, A, 7)
    identity: np.ndarray | None            # (Z,) mean pairwise cosine per z
    shares: dict[str, np.ndarray] | None   # 'female' / 'good_quality' -> (Z,) share per z
    image_shares: dict[str, float] | None  # the same over all images
    best_z: int | None

    def summary(self) -> dict:
        """Every figure as plain JSON types."""
        attributes = {}
        for a in self.swept:
            keep = self.enough
            attributes[a] = {'r': _stats(self.metrics.get('r', a)[keep]),
                             'abs_r': _stats(np.abs(self.metrics.get('r', a)[keep])),
                             'mae': _stats(self.metrics.get('mae', a)[keep])}
        num_z = len(self.enough)
        rules = {}
        for key, rule in self.rules.items():
            if rule is None:
                rules[key] = {'checked': [], 'passed': None, 'rate': None,
                              'note': 'the grid sweeps none of the attributes this rule checks'}
                continue
            passed = int(self.passes[key].sum())
            rules[key] = {'checked': list(rule.thresholds), 'absolute_r': rule.absolute_r,
                          'thresholds': {a: {'min_r': t.min_r, 'max_mae': t.max_mae}
                                         for a, t in rule.thresholds.items()},
                          'passed': passed, 'rate': passed / num_z}
        leakage = {'requested': list(self.swept), 'measured': list(PROPERTY_NAMES),
                   'slope_mean': nan_reduce(np.nanmean, self.slopes).tolist(),
                   'slope_median': nan_reduce(np.nanmedian, self.slopes).tolist(),
                   'z_with_slopes': int(np.isfinite(self.slopes).all(axis=(1, 2)).sum())}
        best = None
        if self.best_z is not None:
            best = {'z_index': int(self.best_z),
                    'r': {a: float(self.metrics.get('r', a)[self.best_z]) for a in self.swept},
                    'mae': {a: float(self.metrics.get('mae', a)[self.best_z]) for a in self.swept}}
        return {
            'num_z': num_z, 'swept': list(self.swept),
            'measured_images': int(self.measured_images.sum()),
            'unmeasured_z': int((~self.enough).sum()),
            'attributes': attributes, 'pass_rules': rules, 'best_z': best, 'leakage': leakage,
            'identity': None if self.identity is None else _stats(self.identity),
            'shares': None if self.image_shares is None else {
                **self.image_shares, 'thresholds': {SHARE_NAMES[p]: t for p, t in THRESHOLDS.items()},
                'per_z': {k: _stats(v) for k, v in self.shares.items()}},
        }


def compute_figures(requested: np.ndarray, measured: np.ndarray, swept, judged: dict[str, np.ndarray] | None = None,
                    identity: np.ndarray | None = None) -> EvaluationFigures:
    """All figures of a run; ``judged`` = {'gender': (Z, L), 'quality': (Z, L)}, ``identity`` (Z, L) per image."""
    swept = tuple(swept)
    requested = np.asarray(requested, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    metrics = per_z_metrics(requested, measured, swept)
    counts = measured_rows(measured).sum(axis=1)
    enough = counts >= MIN_MEASURED
    rules = {key: rule_for(rule, swept) for key, rule in PASS_RULES.items()}
    passes = {key: None if rule is None else rule.passes(metrics) & enough for key, rule in rules.items()}
    best = None
    checked = [a for a in CONTROLLED_ATTRIBUTES if a in swept]
    if passes['upstream_v3'] is not None and checked:
        best = best_passing(metrics, passes['upstream_v3'], checked)
    shares = image_shares = None
    if judged is not None:
        above = {SHARE_NAMES[p]: np.asarray(judged[p], dtype=np.float64) >= t for p, t in THRESHOLDS.items()}
        shares = {k: v.mean(axis=1) for k, v in above.items()}
        image_shares = {k: float(v.mean()) for k, v in above.items()}
    identity_z = None
    if identity is not None:
        identity_z = nan_reduce(np.nanmean, np.asarray(identity, dtype=np.float64), axis=1)
    return EvaluationFigures(swept, metrics, counts, enough, passes, rules,
                             leakage_slopes(requested, measured, swept), identity_z, shares, image_shares, best)
