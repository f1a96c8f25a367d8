"""Hand labels (``img_name,quality,gender``, 1 = good / woman) and when they apply.

The 2,000 shipped labels describe the *published* images 0-1999. They apply only when stage 1 imported that
set (its metadata says ``source: published``); images sampled here with the same numbers are other faces.
``--labels CSV`` applies the user's own labels to the img_nos it lists, whatever stage 1 did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ohlora.errors import PipelineError
from ohlora.layout import Layout, image_name
from ohlora.tables import read_table
from stylegan.sampling import PUBLISHED, image_source

LABEL_COLUMNS = ('quality', 'gender')
NUMBER_COLUMNS = ('img_name', 'img_no')  # upstream names the column img_name; img_no is accepted too


@dataclass(frozen=True)
class Labels:
    img_nos: np.ndarray            # int64, ascending, unique
    values: dict[str, np.ndarray]  # property -> float32 0.0 / 1.0, aligned with img_nos
    origin: str                    # where they came from, for messages and records

    def __len__(self) -> int:
        return len(self.img_nos)

    def of(self, prop: str) -> np.ndarray:
        return self.values[prop]


def read_labels(path: str | Path, what: str) -> Labels:
    """A labels CSV, validated: integer image numbers, no duplicates, values 0 or 1 only (float32, R12)."""
    path = Path(path)
    frame = read_table(path, LABEL_COLUMNS, what)
    number_column = next((c for c in NUMBER_COLUMNS if c in frame.columns), None)
    if number_column is None:
        raise PipelineError(f'{path} lacks the column img_name ({what}; it has {", ".join(map(str, frame.columns))})')
    numbers = frame[number_column]
    if numbers.isna().any():
        raise PipelineError(f'{path} has empty values in column {number_column} ({what})')
    try:
        as_float = numbers.to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise PipelineError(f'{path}: column {number_column} must hold image numbers like 0, 1, 2 ({what})') from None
    if (as_float < 0).any() or (as_float != np.round(as_float)).any():
        raise PipelineError(f'{path}: column {number_column} must hold whole numbers >= 0 ({what})')
    img_nos = as_float.astype(np.int64)
    unique, counts = np.unique(img_nos, return_counts=True)
    if (counts > 1).any():
        raise PipelineError(f'{path} labels image {int(unique[counts > 1][0])} more than once ({what})')
    values = {}
    for column in LABEL_COLUMNS:
        try:
            column_values = frame[column].to_numpy(dtype=np.float64)
        except (ValueError, TypeError):
            raise PipelineError(f'{path}: column {column} must hold 0 or 1 ({what})') from None
        bad = ~np.isin(column_values, (0.0, 1.0))
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise PipelineError(f'{path}: column {column} must hold 0 or 1, found {frame[column].iloc[row]} '
                                f'for image {img_nos[row]} ({what})')
        values[column] = column_values.astype(np.float32)
    order = np.argsort(img_nos, kind='stable')
    return Labels(img_nos[order], {k: v[order] for k, v in values.items()}, origin=str(path))


def applicable_labels(layout: Layout, labels_csv: str | Path | None, available: set[int]) -> Labels | None:
    """The labels that replace CNN scores for this run, or None when every image is to be scored.

    ``available`` holds the image numbers found in the stage-1 folder; a label for any other image is an error
    (it would silently describe nothing, or a different face).
    """
    if labels_csv is not None:
        labels = read_labels(labels_csv, 'labels given with --labels')
        hint = 'check the img_name column'
    else:
        if image_source(layout) != PUBLISHED:
            return None
        labels = read_labels(layout.hand_labels_csv, 'hand labels of the published images')
        labels = Labels(labels.img_nos, labels.values, origin=layout.relative(layout.hand_labels_csv))
        hint = 'the published import is incomplete; rerun run_original_generator.py --published'
    missing = [int(n) for n in labels.img_nos if int(n) not in available]
    if missing:
        raise PipelineError(f'{labels.origin} labels {len(missing)} image(s) that are not in '
                            f'{layout.synthesized_dir} (first: {image_name(missing[0])}); {hint}')
    return labels
