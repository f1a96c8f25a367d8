"""The 7-value label of the Oh-LoRA generators: building it from attribute values, and what to warn about.

The label is a vector of z-scores in the standard order (eyes, hair_color, hair_length, mouth, pose,
background_mean, background_std). v1 was trained on algorithm-1 scores of all seven; v3 on algorithm-2
scores (as predicted by the property CNN) of eyes, mouth and pose only — the other four inputs were fed
during training but never supervised, and every upstream caller sets them to 0.0 (R16). The attribute directions
control the attributes their file was fitted on, in the property CNN's score space.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ohlora.constants import PROPERTY_NAMES, SCORE_COLUMNS
from ohlora.errors import PipelineError
from ohlora.layout import Layout

# The label of upstream's final test (run_fine_tuned_generator.py): eyes open, mouth open, pose -1.2.
UPSTREAM_LABEL = {'eyes': 1.8, 'hair_color': 0.0, 'hair_length': 0.0, 'mouth': 1.6, 'pose': -1.2,
                  'background_mean': 0.0, 'background_std': 0.0}
# The scores behind each model's labels, whose range stage 6 warns about: stage-4 algorithm 1 (v1), algorithm 2
# (v2's generator phase draws its labels around them), or the property CNN's predictions of algorithm 2
# (all_scores_v2_cnn.csv: the labels v3 trained on and the scores the attribute directions are fitted to).
LABEL_SCORES = {'v1': 1, 'v2': 2, 'v3': 'cnn', 'directions': 'cnn'}

# min / max of the published normalised scores (all_scores.csv, all_scores_v2.csv, all_scores_v2_cnn.csv; 4,703
# images each), the fallback range when this root has no scores of its own.
PUBLISHED_SCORE_RANGES = {
    1: {'eyes': (-4.9187, 5.7873), 'hair_color': (-1.7047, 3.2878), 'hair_length': (-3.5479, 1.7481),
        'mouth': (-1.5753, 7.8835), 'pose': (-3.8144, 7.293), 'background_mean': (-1.7554, 1.5742),
        'background_std': (-0.9161, 4.9891)},
    2: {'eyes': (-5.071, 2.8509), 'hair_color': (-1.6744, 3.7915), 'hair_length': (-3.4942, 1.554),
        'mouth': (-1.0138, 3.1907), 'pose': (-2.5582, 10.1687), 'background_mean': (-1.7852, 1.6201),
        'background_std': (-1.0539, 5.2172)},
    'cnn': {'eyes': (-6.3564, 3.4492), 'hair_color': (-1.8867, 4.0981), 'hair_length': (-3.9119, 1.6199),
            'mouth': (-1.4135, 3.2857), 'pose': (-3.044, 9.569), 'background_mean': (-2.2513, 2.1321),
            'background_std': (-1.6712, 6.2512)},
}


def option_name(attribute: str) -> str:
    return '--' + attribute.replace('_', '-')


def check_finite_values(values: dict[str, float]) -> None:
    for attribute, value in values.items():
        if not math.isfinite(value):
            raise PipelineError(f'{option_name(attribute)} {value} is not a finite number')


def label_vector(values: dict[str, float]) -> np.ndarray:
    """The float32 label [7] in the standard order; missing attributes are 0.0."""
    unknown = set(values) - set(PROPERTY_NAMES)
    if unknown:
        raise PipelineError(f'unknown attribute(s) {", ".join(sorted(unknown))}; the label has '
                            f'{", ".join(PROPERTY_NAMES)}')
    check_finite_values(values)
    return np.array([values.get(name, 0.0) for name in PROPERTY_NAMES], dtype=np.float32)


def _ranges_from_stats(path: Path) -> dict[str, tuple[float, float]] | None:
    """Per attribute (min, max) of the normalised scores in a stage-4 statistics file; None if unusable."""
    try:
        columns = json.loads(path.read_text(encoding='utf-8'))['columns']
        ranges = {name: (float(columns[f'{name}_score']['min']), float(columns[f'{name}_score']['max']))
                  for name in PROPERTY_NAMES}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ranges if all(math.isfinite(a) and math.isfinite(b) for a, b in ranges.values()) else None


def _ranges_from_scores_csv(path: Path) -> dict[str, tuple[float, float]] | None:
    """Per attribute (min, max) of a scores CSV (e.g. all_scores_v2_cnn.csv); None if unusable."""
    try:
        frame = pd.read_csv(path, usecols=list(SCORE_COLUMNS))
        ranges = {name: (float(frame[column].min()), float(frame[column].max()))
                  for name, column in zip(PROPERTY_NAMES, SCORE_COLUMNS)}
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    return ranges if all(math.isfinite(a) and math.isfinite(b) for a, b in ranges.values()) else None


def score_ranges(layout: Layout, model: str) -> tuple[dict[str, tuple[float, float]], str, list[str]]:
    """(per-attribute range, where it comes from, notes) for the scores ``model``'s labels come from: this root's
    own scores when it has them (stage 4's statistics, or v2's CNN scores), else the published ones."""
    scores = LABEL_SCORES[model]
    path = layout.property_cnn_scores_csv if scores == 'cnn' else layout.property_scores_stats(scores)
    notes = []
    if path.is_file():
        ranges = _ranges_from_scores_csv(path) if scores == 'cnn' else _ranges_from_stats(path)
        if ranges is not None:
            return ranges, f'{path.name} of this root', notes
        notes.append(f'{path} has no usable min/max per score column; using the published ranges')
    published = 'property-CNN' if scores == 'cnn' else f'algorithm-{scores}'
    return PUBLISHED_SCORE_RANGES[scores], f'the published {published} scores', notes


def label_warnings(values: dict[str, float], model: str, trained: tuple[str, ...],
                   ranges: dict[str, tuple[float, float]], source: str, via: str | None = None) -> list[str]:
    """One line per value that the model never learned (non-zero; ``trained``: the attributes it controls) or that
    lies outside the range of its training scores.

    ``via`` names the option the values came from when it is not the attribute's own (e.g. '--values').
    """
    lines = []
    for attribute in PROPERTY_NAMES:
        if attribute not in values:
            continue
        value = values[attribute]
        given = f'{attribute} {value:g} in {via}' if via else f'{option_name(attribute)} {value:g}'
        if attribute not in trained and value != 0.0:
            lines.append(f'{given}: {model} was never trained on {attribute} (only '
                         f'{", ".join(trained)}), so this value changes the image in no controlled way; upstream '
                         'always passes 0')
            continue
        low, high = ranges[attribute]
        if not low <= value <= high:
            lines.append(f'{given} is outside {low:g} to {high:g}, the range of the '
                         f'{attribute} scores in {source}; expect an unrealistic image')
    return lines
