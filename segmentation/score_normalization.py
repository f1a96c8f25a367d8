"""Z-score normalisation of the raw property scores, with statistics that are saved and reusable (§6.6, R6).

Upstream (``normalize_all_scores``) replaces each column by (x - mean) / std with pandas' *sample* std
(ddof = 1) and rounds every value to 4 decimals with Python's ``round``; it saved neither the raw scores nor
the statistics. Here the statistics are kept in ``all_scores[_v2]_stats.json`` so that the raw scores of new
images map into the same space (:func:`normalise_with_stats`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError

DECIMALS = 4
STD_DDOF = 1


@dataclass(frozen=True)
class ColumnStats:
    """What one score column was normalised with: z = (x - mean) / std; n rows gave mean and std."""
    mean: float
    std: float
    n: int


def compute_stats(raw: pd.DataFrame) -> dict[str, ColumnStats]:
    """Mean and sample std (ddof = 1, pandas) of every score column; too few rows or a constant column is an error."""
    if len(raw) < 2:
        raise PipelineError(f'cannot normalise {len(raw)} image(s): the sample std needs at least 2; '
                            f'pass --stats FILE to use saved statistics')
    stats = {}
    for column in SCORE_COLUMNS:
        values = raw[column].astype('float64')
        mean, std = float(values.mean()), float(values.std(ddof=STD_DDOF))
        if not (math.isfinite(std) and std > 0):
            raise PipelineError(f'{column} has the same value in all {len(raw)} images (std {std}); cannot normalise '
                                f'it; pass --stats FILE to use saved statistics')
        stats[column] = ColumnStats(mean, std, len(raw))
    return stats


def normalise_with_stats(raw: pd.DataFrame, stats: dict[str, ColumnStats]) -> pd.DataFrame:
    """The score columns as z-scores rounded to 4 decimals (Python ``round`` per value, as upstream).

    Other columns are kept as they are.
    """
    normalised = raw.copy()
    for column in SCORE_COLUMNS:
        z = (raw[column].to_numpy(dtype=np.float64) - stats[column].mean) / stats[column].std
        # np.round rounds x*10^4 and can differ from the correctly rounded Python round() in the last decimal.
        normalised[column] = [round(float(v), DECIMALS) for v in z]
    return normalised


def normalise(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, ColumnStats]]:
    """Upstream's ``normalize_all_scores``: statistics from these rows, then z-scores. Returns both."""
    stats = compute_stats(raw)
    return normalise_with_stats(raw, stats), stats


def stats_document(stats: dict[str, ColumnStats], normalised: pd.DataFrame, **extra) -> dict:
    """The JSON content of a stats file: per column mean, std, n and the range of the normalised column."""
    columns = {}
    for column in SCORE_COLUMNS:
        entry = {'mean': stats[column].mean, 'std': stats[column].std, 'n': stats[column].n}
        if len(normalised):
            entry['min'] = float(normalised[column].min())
            entry['max'] = float(normalised[column].max())
        columns[column] = entry
    return {'columns': columns, 'score_columns': list(SCORE_COLUMNS), 'std_ddof': STD_DDOF, 'decimals': DECIMALS,
            **extra}


def read_stats(path: str | Path, algorithm: int | None = None) -> dict[str, ColumnStats]:
    """The per-column statistics of a stats file written by this stage; one-line errors for anything unusable.

    With ``algorithm``, the file must say it holds that algorithm's statistics: the two algorithms' scores live on
    different scales, so normalising with the other's mean and std gives plausible-looking, wrong z-scores.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f'{path}: no such statistics file')
    try:
        document = json.loads(path.read_text(encoding='utf-8'))
        columns = document['columns']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PipelineError(f'{path} is not a property-score statistics file (expected a JSON object with '
                            f'"columns")') from None
    if algorithm is not None:
        recorded = document.get('algorithm')
        if recorded is None:
            raise PipelineError(f'{path} does not say which algorithm its statistics belong to (no "algorithm"); '
                                f'--algorithm {algorithm} needs the stats file of an algorithm-{algorithm} run')
        if recorded != algorithm:
            raise PipelineError(f'{path} holds algorithm-{recorded} statistics, but this run uses --algorithm '
                                f'{algorithm}; pass the stats file of an algorithm-{algorithm} run')
    if not isinstance(columns, dict):
        raise PipelineError(f'{path}: "columns" is not a JSON object (property-score statistics)')
    declared = document.get('score_columns', list(SCORE_COLUMNS))
    unknown = sorted(set(map(str, columns)) - set(SCORE_COLUMNS))
    if unknown or not isinstance(declared, list) or sorted(map(str, declared)) != sorted(SCORE_COLUMNS):
        raise PipelineError(f'{path} holds statistics of other columns than the seven property scores '
                            f'({", ".join(unknown[:3]) or "score_columns " + str(declared)[:60]})')
    stats = {}
    for column in SCORE_COLUMNS:
        entry = columns.get(column) if isinstance(columns, dict) else None
        try:
            mean, std, n = float(entry['mean']), float(entry['std']), int(entry['n'])
        except (KeyError, TypeError, ValueError):
            raise PipelineError(f'{path} has no usable mean/std/n for {column}') from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise PipelineError(f'{path}: {column} has mean {mean} and std {std}; the std must be finite and > 0')
        stats[column] = ColumnStats(mean, std, n)
    return stats


def read_raw_scores(path: str | Path) -> pd.DataFrame:
    """A raw-score CSV (``img_no`` + the 7 score columns), validated; extra columns are dropped."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f'{path}: no such file (expected raw property scores)')
    try:
        frame = pd.read_csv(path)  # pandas' default parser reads the written repr back as the same double
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f'{path} is not a readable CSV (raw property scores): {str(exc).strip()[:160]}') from None
    required = ('img_no',) + SCORE_COLUMNS
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PipelineError(f'{path} lacks the column(s) {", ".join(missing)} (raw property scores)')
    frame = frame.loc[:, list(required)]
    try:
        values = frame.loc[:, list(SCORE_COLUMNS)].to_numpy(dtype=np.float64)
        img_nos = frame['img_no'].to_numpy(dtype=np.int64)
    except (ValueError, TypeError):
        raise PipelineError(f'{path} has non-numeric values (raw property scores)') from None
    if not np.isfinite(values).all():
        raise PipelineError(f'{path} has NaN or infinite values (raw property scores)')
    if len(np.unique(img_nos)) != len(img_nos):
        raise PipelineError(f'{path} lists an img_no twice (raw property scores)')
    frame['img_no'] = img_nos
    return frame
