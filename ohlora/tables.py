"""Reading the pipeline's CSVs: both upstream and project forms, validated, float32 at the boundary (R4, R12)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ohlora.errors import PipelineError


def read_table(path: str | Path, required: tuple[str, ...] | list[str], what: str) -> pd.DataFrame:
    """A CSV with the ``required`` columns and no NaN in them; the upstream unnamed index column is dropped."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f'{path}: no such file (expected the {what})')
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f'{path} is not a readable CSV ({what}): {str(exc).strip()[:160]}') from None
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith('Unnamed: ')]]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PipelineError(f'{path} lacks the column(s) {", ".join(missing)} ({what}; it has '
                            f'{", ".join(map(str, frame.columns[:12]))})')
    if frame.empty:
        raise PipelineError(f'{path} has no rows ({what})')
    bad = [c for c in required if frame[c].isna().any()]
    if bad:
        row = int(frame[bad[0]].isna().to_numpy().nonzero()[0][0])
        raise PipelineError(f'{path} has empty or NaN values in column {bad[0]} (first at data row {row}; {what})')
    return frame


def float32_matrix(frame: pd.DataFrame, columns, path: str | Path, what: str) -> np.ndarray:
    """Numeric columns as a float32 array; non-numeric or non-finite values are a one-line error."""
    try:
        values = frame.loc[:, list(columns)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise PipelineError(f'{path} has non-numeric values in {", ".join(map(str, columns))} ({what})') from None
    if not np.isfinite(values).all():
        raise PipelineError(f'{path} has NaN or infinite values ({what})')
    single = values.astype(np.float32)
    if not np.isfinite(single).all():  # 1e39 is a finite float64 but inf in the float32 the models read (R12)
        raise PipelineError(f'{path} has values beyond the float32 range (e.g. 1e39) ({what})')
    return single
