"""Fitting one linear direction per attribute in w, from sampled w and property-CNN scores.

* ``ridge`` (default): least squares (scikit-learn ``Ridge``) of each score on w. The coefficient vector
  is the score gradient: its direction is the attribute's direction, its length the score change per unit
  step, and with the intercept it predicts the score of any w.
* ``svm``: upstream's VectorFind recipe. Per attribute, a ``LinearSVC`` separates the top ``fraction``
  of the (training) samples by score from the bottom ``fraction`` (on centred w: liblinear penalises the
  intercept, which tilts the normal when w's mean is far from 0); its unit normal is the direction. An SVM
  gives no scale, so the calibration is the full least-squares model of each score on w (ridge, ``alpha``):
  its gradient A_a predicts the score of any w, and the step-to-score slope along the normal is A_a · n_a.
  Regressing the score on w · n_a alone, as before, is biased whenever w varies along directions that the
  normal misses but the score does not (anisotropic w): the other directions' share of the score is then
  partly credited to w · n_a, and the prediction of the unedited w misses their share altogether. Edits
  move w within the span of the normals (see ``directions_file``). With ``groups``, the samples are split at
  the medians of hair_color, hair_length and background_mean (8 groups, as upstream) and each group gets its
  own model.
* ``orthogonal``: the attributes not controlled are fitted too and held; each controlled direction is
  projected off the span of every other fitted direction (InterFaceGAN's conditional manipulation).

A seeded share of the samples (``holdout``) is kept out of every fit and gives the fit quality: R² and
Pearson r of the predicted against the measured scores (ridge, and the svm calibration); for svm also the
accuracy on the held-out top/bottom samples and the cosine between each normal and its score gradient.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ohlora.constants import PROPERTY_NAMES
from ohlora.devices import library_seed
from ohlora.errors import PipelineError
from stylegan_modified.attribute_metrics import pearson_r
from stylegan_modified.directions_file import GROUP_ATTRIBUTES, METHODS, AttributeDirections

logger = logging.getLogger(__name__)

DEFAULT_ATTRIBUTES = ('eyes', 'mouth', 'pose')
# Streams of ohlora.devices.library_seed: numpy and scikit-learn take seeds in [0, 2**32) only, so theirs are
# derived from --seed (any int) instead of passing it through.
SPLIT_STREAM, SVM_STREAM = 91, 92


@dataclass(frozen=True)
class FitOptions:
    method: str = 'ridge'
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    orthogonal: bool = False
    fraction: float = 0.2        # svm: top / bottom share of the scores
    groups: bool = False         # svm: one model per hair_color x hair_length x background_mean median group
    alpha: float = 1.0           # ridge: L2 penalty (scikit-learn's alpha)
    svm_c: float = 1.0           # svm: LinearSVC's C
    holdout: float = 0.1         # share of samples kept out of the fit, for the fit quality
    seed: int = 0                # any int: the held-out split and LinearSVC's random_state are derived from it

    @property
    def held_attributes(self) -> tuple[str, ...]:
        return tuple(a for a in PROPERTY_NAMES if a not in self.attributes) if self.orthogonal else ()

    def as_json(self) -> dict:
        return {'method': self.method, 'orthogonal': self.orthogonal, 'fraction': self.fraction,
                'groups': self.groups, 'alpha': self.alpha, 'svm_c': self.svm_c, 'holdout': self.holdout}


def check_fit_options(options: FitOptions) -> None:
    """Every option problem as one ``PipelineError`` line, before anything is sampled or written."""
    if options.method not in METHODS:
        raise PipelineError(f'--method {options.method!r}: choose one of {", ".join(METHODS)}')
    unknown = [a for a in options.attributes if a not in PROPERTY_NAMES]
    if unknown:
        raise PipelineError(f'--attributes: unknown attribute {unknown[0]!r}; choose from {", ".join(PROPERTY_NAMES)}')
    if not options.attributes or len(set(options.attributes)) != len(options.attributes):
        raise PipelineError(f'--attributes must list at least one attribute, each once (got {",".join(options.attributes)})')
    if isinstance(options.seed, bool) or not isinstance(options.seed, (int, np.integer)):
        raise PipelineError(f'--seed must be a whole number, got {options.seed!r}')
    if not 0.0 < options.fraction <= 0.5:
        raise PipelineError(f'--fraction must be in (0, 0.5], got {options.fraction}')
    if not 0.0 < options.holdout < 1.0:
        raise PipelineError(f'--holdout must be in (0, 1), got {options.holdout}')
    if not (np.isfinite(options.alpha) and options.alpha >= 0):
        raise PipelineError(f'--alpha must be a finite number >= 0, got {options.alpha}')
    if not (np.isfinite(options.svm_c) and options.svm_c > 0):
        raise PipelineError(f'--svm-c must be a finite number > 0, got {options.svm_c}')
    if options.groups and options.method != 'svm':
        raise PipelineError('--groups applies to --method svm only (upstream grouped its SVMs)')


MIN_TRAINING_SAMPLES = 8  # a training split smaller than this (e.g. --holdout 0.999) is refused, not fitted


def split_sizes(num: int, holdout: float) -> tuple[int, int]:
    """(training, held-out) counts of :func:`holdout_split`: the held-out share is at least 2 samples."""
    held = min(max(2, int(round(num * holdout))), num - 2)
    return num - held, held


def minimum_training_samples(options: FitOptions) -> int:
    """The fewest training samples a fit runs on: MIN_TRAINING_SAMPLES, and (svm) enough for a top and a bottom
    class in every group (the per-group check of :func:`_fit_svm`)."""
    needed = MIN_TRAINING_SAMPLES
    if options.method == 'svm':
        needed = max(needed, 2 * int(np.ceil(1 / options.fraction)) * (2 ** len(GROUP_ATTRIBUTES) if options.groups
                                                                        else 1))
    return needed


def minimum_samples(options: FitOptions) -> int:
    """The fewest samples a fit can run on: the held-out share rounds to 2 samples or more, and the training split
    that is left holds :func:`minimum_training_samples` (with --holdout 0.999 that takes thousands)."""
    needed = max(4, int(np.ceil(2 / options.holdout)) + 2)
    training = minimum_training_samples(options)
    # The training count never falls as num grows (round(num * holdout) rises by at most 1 per sample), so the
    # smallest num that leaves enough is found by bisection between the bounds that rounding allows.
    low = max(needed, int(np.floor((training - 0.5) / (1 - options.holdout))))
    high = max(low, int(np.ceil((training + 0.5) / (1 - options.holdout))) + 2)
    while low < high:
        middle = (low + high) // 2
        if split_sizes(middle, options.holdout)[0] >= training:
            high = middle
        else:
            low = middle + 1
    return max(needed, low)


def holdout_split(num: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sample indices, sorted; the held-out share is at least 2 samples."""
    order = np.random.default_rng(library_seed(seed, SPLIT_STREAM)).permutation(num)
    held = split_sizes(num, holdout)[1]
    return np.sort(order[held:]), np.sort(order[:held])


def held_out_r(predicted: np.ndarray, measured: np.ndarray) -> float | None:
    """Pearson r of the held-out predictions; None (n/a) below 3 samples, where r is ±1 whatever the fit."""
    return float(pearson_r(predicted, measured)) if len(measured) >= 3 else None


def _r2(predicted: np.ndarray, measured: np.ndarray) -> float:
    total = float(np.sum((measured - measured.mean()) ** 2))
    return 1.0 - float(np.sum((measured - predicted) ** 2)) / total if total > 0 else 0.0


def fit_least_squares(w: np.ndarray, targets: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients [T, d], intercepts [T]) of ridge regressions of each target column on w."""
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=alpha, fit_intercept=True).fit(w, targets)
    return np.atleast_2d(model.coef_).astype(np.float64), np.atleast_1d(model.intercept_).astype(np.float64)


def _top_bottom(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the bottom and the top ``fraction`` of ``scores`` (at least one each, never a sample in both:
    with fraction 0.5 and an odd count the middle one is left out; ties by index)."""
    k = min(max(1, int(round(fraction * scores.shape[0]))), scores.shape[0] // 2)
    order = np.argsort(scores, kind='stable')
    return order[:k], order[-k:]


def fit_svm_normal(w: np.ndarray, scores: np.ndarray, fraction: float, c: float, seed: int) -> np.ndarray:
    """Unit normal [d] of a LinearSVC separating the top ``fraction`` of scores (label 1) from the bottom.

    w is centred first: liblinear treats the intercept as one more weight and penalises it, so on w far from
    the origin the max-margin normal tilts to keep the intercept small (the direction would depend on where
    w's origin is). Centring makes it translation-invariant.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    bottom, top = _top_bottom(scores, fraction)
    w = w - w.mean(axis=0)
    x = np.concatenate([w[bottom], w[top]])
    y = np.concatenate([np.zeros(len(bottom)), np.ones(len(top))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ConvergenceWarning)
        svm = LinearSVC(C=c, dual='auto', max_iter=10_000, random_state=library_seed(seed, SVM_STREAM)).fit(x, y)
    if any(issubclass(item.category, ConvergenceWarning) for item in caught):
        logger.warning('LinearSVC did not fully converge (%d samples); the direction may be less precise', len(y))
    normal = svm.coef_[0].astype(np.float64)
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm == 0:
        raise PipelineError('an SVM found no separating direction (its normal is zero); sample more (--num)')
    return normal / norm


def svm_accuracy(w: np.ndarray, scores: np.ndarray, normal: np.ndarray, fraction: float) -> float:
    """Accuracy of the best threshold on w · normal at telling the top ``fraction`` from the bottom one.

    The threshold is the midpoint between the two classes' mean projections: a calibration-free version
    of the SVM's own decision (whose offset depends on the regularisation).
    """
    bottom, top = _top_bottom(scores, fraction)
    projection = w @ normal
    threshold = 0.5 * (projection[bottom].mean() + projection[top].mean())
    correct = np.sum(projection[bottom] <= threshold) + np.sum(projection[top] > threshold)
    return float(correct) / (len(bottom) + len(top))


def calibrate(w: np.ndarray, scores: np.ndarray, normals: np.ndarray, alpha: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gradients [F, d], intercepts [F], slopes [F]) for SVM ``normals`` [F, d] of the score columns [n, F].

    The gradient and intercept are the full least-squares model of each score on w (the same ridge as
    ``--method ridge``), so the predicted score of any w is right whatever the normal misses; the slope is the
    score change per unit step along the normal, gradient · normal.
    """
    gradients, intercepts = fit_least_squares(w, scores, alpha)
    return gradients, intercepts, np.einsum('fd,fd->f', gradients, normals)


def orthogonalize(normals: np.ndarray, names) -> np.ndarray:
    """Unit edit directions [A, d] for the first A = len(names) rows of ``normals``: each projected off the span
    of all the other rows, so that a step along it leaves every other fitted attribute's prediction unchanged."""
    directions = []
    for a, name in enumerate(names):
        others = np.delete(normals, a, axis=0)
        direction = normals[a].copy()
        if len(others):
            basis, singular, _ = np.linalg.svd(others.T, full_matrices=False)
            basis = basis[:, singular > 1e-10 * max(1.0, singular.max())]
            direction = direction - basis @ (basis.T @ direction)
        norm = np.linalg.norm(direction)
        if norm < 1e-8:
            raise PipelineError(f'--orthogonal: the direction of {name} lies in the span of the other attributes\' '
                                'directions; nothing is left of it after projecting them off')
        directions.append(direction / norm)
    return np.stack(directions)


def _columns(scores: np.ndarray, names) -> np.ndarray:
    return scores[:, [PROPERTY_NAMES.index(n) for n in names]]


def _check_variation(scores: np.ndarray, names, where: str = '') -> None:
    flat = [n for n, column in zip(names, scores.T) if np.ptp(column) == 0]
    if flat:
        raise PipelineError(f'the scores of {flat[0]} do not vary{where}; no direction can be fitted')


def _fit_ridge(w, scores, fitted, options, train, test):
    weights, intercepts = fit_least_squares(w[train], _columns(scores[train], fitted), options.alpha)
    predicted = w[test] @ weights.T + intercepts
    measured = _columns(scores[test], fitted)
    quality = {name: {'r2': _r2(predicted[:, i], measured[:, i]),
                      'r': held_out_r(predicted[:, i], measured[:, i]), 'n_test': int(len(test))}
               for i, name in enumerate(fitted)}
    return weights[None], intercepts[None], quality


def _group_numbers(scores: np.ndarray, medians: np.ndarray) -> np.ndarray:
    above = (_columns(scores, GROUP_ATTRIBUTES) > medians).astype(np.int64)
    return above @ (2 ** np.arange(len(GROUP_ATTRIBUTES) - 1, -1, -1))


def _fit_svm(w, scores, fitted, options, train, test, medians):
    groups = 2 ** len(GROUP_ATTRIBUTES) if options.groups else 1
    train_group = _group_numbers(scores[train], medians) if options.groups else np.zeros(len(train), np.int64)
    test_group = _group_numbers(scores[test], medians) if options.groups else np.zeros(len(test), np.int64)
    d = w.shape[1]
    normals, weights = np.zeros((groups, len(fitted), d)), np.zeros((groups, len(fitted), d))
    slopes, intercepts = np.zeros((groups, len(fitted))), np.zeros((groups, len(fitted)))
    accuracy = {n: [] for n in fitted}
    predicted = np.zeros((len(test), len(fitted)))
    for g in range(groups):
        rows, held = train[train_group == g], test[test_group == g]
        where = f' in group {g}' if options.groups else ''
        if len(rows) < 2 * int(np.ceil(1 / options.fraction)):
            raise PipelineError(f'only {len(rows)} training samples{where}; too few for the SVM, sample more (--num)')
        _check_variation(_columns(scores[rows], fitted), fitted, where)
        for i, name in enumerate(fitted):
            column = scores[rows, PROPERTY_NAMES.index(name)]
            normals[g, i] = fit_svm_normal(w[rows], column, options.fraction, options.svm_c, options.seed)
            if len(held) >= 2:  # a top and a bottom sample at least
                held_scores = scores[held, PROPERTY_NAMES.index(name)]
                accuracy[name].append((svm_accuracy(w[held], held_scores, normals[g, i], options.fraction),
                                       len(held)))
        weights[g], intercepts[g], slopes[g] = calibrate(w[rows], _columns(scores[rows], fitted), normals[g],
                                                         options.alpha)
        flat = [name for name, slope in zip(fitted, slopes[g]) if not slope > 0]
        if flat:
            raise PipelineError(f'a step along the SVM normal of {flat[0]}{where} does not raise its predicted score '
                                '(the normal is at right angles to, or against, the score gradient); sample more '
                                '(--num) or use --method ridge')
        predicted[test_group == g] = w[held] @ weights[g].T + intercepts[g]
    measured = _columns(scores[test], fitted)
    cosines = slopes / np.linalg.norm(weights, axis=2)  # cos(normal, gradient) per group and attribute
    quality = {}
    for i, name in enumerate(fitted):
        pairs = accuracy[name]
        mean = sum(a * n for a, n in pairs) / max(1, sum(n for _, n in pairs)) if pairs else None
        quality[name] = {'accuracy': mean, 'r': held_out_r(predicted[:, i], measured[:, i]),
                         'r2': _r2(predicted[:, i], measured[:, i]), 'n_test': int(len(test)),
                         'cos_gradient': float(cosines[:, i].mean())}
        if options.groups:
            quality[name]['accuracy_per_group'] = [float(a) for a, _ in pairs]
            quality[name]['cos_gradient_per_group'] = [float(c) for c in cosines[:, i]]
    return weights, intercepts, quality, normals, slopes


def fit_directions(w: torch.Tensor, scores: torch.Tensor, options: FitOptions, **record) -> AttributeDirections:
    """Fit the directions of ``options.attributes`` (and the held ones) on samples w [n, d], scores [n, 7].

    ``record`` fills the identity fields of :class:`AttributeDirections` (generator, property_cnn, num,
    seed, layers); without ``layers`` the edits apply to every synthesis layer.
    """
    check_fit_options(options)
    w_np = w.detach().cpu().double().numpy()
    scores_np = scores.detach().cpu().double().numpy()
    if w_np.shape[0] != scores_np.shape[0] or scores_np.shape[1:] != (len(PROPERTY_NAMES),):
        raise ValueError(f'w {list(w_np.shape)} and scores {list(scores_np.shape)} do not pair up as [n, d], [n, 7]')
    if w_np.shape[0] < minimum_samples(options):
        raise PipelineError(f'{w_np.shape[0]} samples are too few for this fit (--holdout {options.holdout:g} leaves '
                            f'{split_sizes(w_np.shape[0], options.holdout)[0]} to fit on, it needs '
                            f'{minimum_training_samples(options)}); --num must be at least {minimum_samples(options)}')
    fitted = options.attributes + options.held_attributes
    train, test = holdout_split(w_np.shape[0], options.holdout, options.seed)
    _check_variation(_columns(scores_np[train], fitted), fitted)

    group_kwargs = {}
    medians = None
    if options.groups:
        medians = np.median(_columns(scores_np[train], GROUP_ATTRIBUTES), axis=0)
        group_weights, group_intercepts = fit_least_squares(w_np[train], _columns(scores_np[train], GROUP_ATTRIBUTES),
                                                            options.alpha)
        group_kwargs = dict(group_attributes=GROUP_ATTRIBUTES, group_weights=torch.from_numpy(group_weights),
                            group_intercepts=torch.from_numpy(group_intercepts), group_medians=torch.from_numpy(medians))

    if options.method == 'ridge':
        weights, intercepts, quality = _fit_ridge(w_np, scores_np, fitted, options, train, test)
        slopes = np.linalg.norm(weights, axis=2)
        if np.any(slopes == 0):
            raise PipelineError('a ridge fit gave a zero coefficient vector; lower --alpha or sample more (--num)')
        normals = weights / slopes[..., None]
    else:
        weights, intercepts, quality, normals, slopes = _fit_svm(w_np, scores_np, fitted, options, train, test, medians)

    if options.orthogonal:
        directions = np.stack([orthogonalize(normals[g], options.attributes) for g in range(normals.shape[0])])
    else:
        directions = normals[:, :len(options.attributes)].copy()

    fitted_directions = AttributeDirections(
        method=options.method, attributes=options.attributes, held_attributes=options.held_attributes,
        weights=torch.from_numpy(weights), intercepts=torch.from_numpy(intercepts), normals=torch.from_numpy(normals),
        slopes=torch.from_numpy(slopes), directions=torch.from_numpy(directions), options=options.as_json(),
        fit_quality=quality, **group_kwargs, **record)
    if options.groups:
        # how often the group chosen at edit time (from w) is the group the CNN's scores put the sample in
        chosen = fitted_directions.group_of(torch.from_numpy(w_np[test])).numpy()
        quality['group_agreement'] = float(np.mean(chosen == _group_numbers(scores_np[test], medians)))
    return fitted_directions
