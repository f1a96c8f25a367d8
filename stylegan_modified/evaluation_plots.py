"""The evaluation's plots as PNG bytes (matplotlib's Agg canvas; no pyplot, no global backend state)."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stylegan_modified.evaluation_figures import EvaluationFigures, nan_reduce

UPSTREAM_COLOUR, STRICT_COLOUR = 'tab:red', 'tab:purple'


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=100, metadata={'Software': None})
    return buffer.getvalue()


def _threshold_marks(axis, x: float, rules, attribute: str, metric: str) -> None:
    """Short horizontal marks at a bar: the upstream v3 rule (red) and the strict rule (purple, |r|)."""
    for key, colour, style in (('upstream_v3', UPSTREAM_COLOUR, '-'), ('strict', STRICT_COLOUR, '--')):
        rule = rules.get(key)
        threshold = rule.thresholds.get(attribute) if rule is not None else None
        if threshold is None:
            continue
        value = threshold.min_r if metric == 'r' else threshold.max_mae
        if value is None:
            continue
        for mark in ((value, -value) if metric == 'r' and rule.absolute_r else (value,)):
            axis.hlines(mark, x - 0.4, x + 0.4, colors=colour, linestyles=style, linewidth=2)


def r_and_mae(figures: EvaluationFigures, title: str) -> bytes:
    """Mean r and mean MAE per attribute over z (bars, whiskers p10-p90), thresholds marked."""
    figure = Figure(figsize=(9, 4))
    keep = figures.enough
    panels = (('r', 'Pearson r (requested vs measured)'), ('mae', 'MAE (z-score units)'))
    for column, (metric, label) in enumerate(panels):
        axis = figure.add_subplot(1, 2, column + 1)
        for x, attribute in enumerate(figures.swept):
            values = figures.metrics.get(metric, attribute)[keep]
            values = values[np.isfinite(values)]
            if values.size:
                mean = values.mean()
                p10, p90 = np.percentile(values, [10, 90])
                axis.bar(x, mean, color='tab:blue', alpha=0.7)
                whiskers = [[max(mean - p10, 0.0)], [max(p90 - mean, 0.0)]]  # round-off can cross the mean
                axis.errorbar(x, mean, yerr=whiskers, color='black', capsize=4)
            _threshold_marks(axis, x, figures.rules, attribute, metric)
        axis.set_xticks(range(len(figures.swept)), figures.swept, rotation=20)
        axis.set_ylabel(label)
        if metric == 'r':
            axis.set_ylim(-1.05, 1.05)
            axis.axhline(0, color='grey', linewidth=0.8)
        axis.set_title(f'mean {metric.upper() if metric == "mae" else metric} over z (p10-p90)')
    figure.suptitle(f'{title}\nred: upstream v3 rule; purple dashed: strict rule (|r|)', fontsize=9)
    figure.tight_layout()
    return _png(figure)


def r_distribution(figures: EvaluationFigures, title: str) -> bytes:
    """Histogram of the per-z r of each attribute, with the rules' r thresholds as vertical lines."""
    count = len(figures.swept)
    figure = Figure(figsize=(3.2 * count, 3.2))
    bins = np.linspace(-1, 1, 41)
    for k, attribute in enumerate(figures.swept):
        axis = figure.add_subplot(1, count, k + 1)
        values = figures.metrics.get('r', attribute)[figures.enough]
        axis.hist(values, bins=bins, color='tab:blue', alpha=0.8)
        for key, colour, style in (('upstream_v3', UPSTREAM_COLOUR, '-'), ('strict', STRICT_COLOUR, '--')):
            rule = figures.rules.get(key)
            threshold = rule.thresholds.get(attribute) if rule is not None else None
            if threshold is not None:
                axis.axvline(threshold.min_r, color=colour, linestyle=style)
                if rule.absolute_r:
                    axis.axvline(-threshold.min_r, color=colour, linestyle=style)
        axis.set_title(f'{attribute} (n = {values.size} z)')
        axis.set_xlabel('r per z')
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _png(figure)


def leakage_heat_map(figures: EvaluationFigures, measured_names, title: str) -> bytes:
    """Mean slope (measured per unit requested) as a diverging heat map with the values written in."""
    slopes = nan_reduce(np.nanmean, figures.slopes)
    figure = Figure(figsize=(1.2 * len(measured_names) + 2, 0.7 * len(figures.swept) + 2))
    axis = figure.add_subplot(1, 1, 1)
    finite = slopes[np.isfinite(slopes)]
    limit = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    image = axis.imshow(np.nan_to_num(slopes), cmap='RdBu_r', vmin=-limit, vmax=limit, aspect='auto')
    for i in range(slopes.shape[0]):
        for j in range(slopes.shape[1]):
            value = slopes[i, j]
            text = 'n/a' if not np.isfinite(value) else f'{round(value, 2) + 0.0:.2f}'
            dark = np.isfinite(value) and abs(value) > 0.6 * limit
            axis.text(j, i, text, ha='center', va='center', fontsize=8, color='white' if dark else 'black')
    axis.set_xticks(range(len(measured_names)), [f'measured\n{m}' for m in measured_names], fontsize=8)
    axis.set_yticks(range(len(figures.swept)), [f'requested {a}' for a in figures.swept], fontsize=8)
    figure.colorbar(image, ax=axis, label='slope')
    axis.set_title(f'{title}\nmean slope over z: own attribute = gain (ideal 1), others = leakage (ideal 0)',
                   fontsize=9)
    figure.tight_layout()
    return _png(figure)
