"""What both property-score algorithms share: the map geometry, validated image reading, the background score.

Every score is computed with whole-array numpy operations on the 224x224 parsing map (R7). Where the
upstream code would crash or return None/NaN/inf, the algorithms return the spec's guard value (§6.5) and
name the guard they used, so that the stage can count the hits and keep the image (R5).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ohlora.constants import NUM_PARSING_CLASSES, PARSING_SIZE, SCORE_COLUMNS
from ohlora.errors import PipelineError

# The map geometry (PARSED_MAP_SIZE, here PARSING_SIZE, and its integer fractions, §6.1).
QUARTER = PARSING_SIZE // 4              # 56: top of the eye areas; left edge of the right-eye area
THREE_QUARTERS = 3 * PARSING_SIZE // 4   # 168: bottom (exclusive) of the eye areas; right edge of the left-eye area
HALF = PARSING_SIZE // 2                 # 112: the top half ends here; the bottom row splits here
ALG1_EYE_ROWS = 3 * PARSING_SIZE // 8    # 84: algorithm 1 scans only this many rows of each eye area (R16)
BOTTOM_ROW = PARSING_SIZE - 1            # 223

# FaceXFormer / LaPa classes used by the scores (§5 class table).
BACKGROUND, LEFT_EYE, RIGHT_EYE, NOSE, UPPER_LIP, INNER_MOUTH, LOWER_LIP, HAIR = 0, 4, 5, 6, 7, 8, 9, 10

# Background special cases (§6.4).
NO_BACKGROUND_MEAN = 192.0


@dataclass(frozen=True)
class ImageScores:
    """The seven raw scores of one image in the standard order, and the guards (§6.5) that produced any of them."""
    img_no: int
    values: tuple[float, ...]
    guards: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, float]:
        return dict(zip(SCORE_COLUMNS, self.values))


def _imread(path: Path, flags: int, missing: str, what: str) -> np.ndarray:
    """``cv2.imread``, with one line when the file is missing (``missing``) or not an image."""
    if not path.is_file():
        raise PipelineError(f'{path}: {missing}')
    image = cv2.imread(str(path), flags)
    if image is None:
        raise PipelineError(f'{path} is not a readable image ({what})')
    return image


def read_parsing_map(path: str | Path) -> np.ndarray:
    """A stage-3 parsing map as a (224, 224) uint8 class map; a wrong size or a class above 10 is an error."""
    path = Path(path)
    image = _imread(path, cv2.IMREAD_UNCHANGED, 'no such parsing map (run stage 3 first)', 'parsing map')
    if image.ndim == 3 and image.shape[2] >= 3 and (image[..., :3] == image[..., :1]).all():
        image = image[..., 0]  # a grey map saved as colour: every channel holds the class id
    if image.ndim != 2 or image.dtype != np.uint8:
        raise PipelineError(f'{path} is not a single-channel 8-bit class map (shape {image.shape}, {image.dtype})')
    if image.shape != (PARSING_SIZE, PARSING_SIZE):
        raise PipelineError(f'{path} is {image.shape[1]}x{image.shape[0]}; a parsing map must be '
                            f'{PARSING_SIZE}x{PARSING_SIZE}')
    top = int(image.max())
    if top >= NUM_PARSING_CLASSES:
        raise PipelineError(f'{path} holds class {top}; parsing maps hold classes 0-{NUM_PARSING_CLASSES - 1}')
    return image


def read_bgr(path: str | Path, what: str) -> np.ndarray:
    """A colour image as OpenCV decodes it: (H, W, 3) uint8 in BGR order (R15)."""
    return _imread(Path(path), cv2.IMREAD_COLOR, f'no such file (the {what})', f'the {what}')


def channel_sums(colour: np.ndarray) -> np.ndarray:
    """B + G + R of every pixel as exact integers (0-765); the per-pixel channel mean is this / 3."""
    sums = colour[..., 0].astype(np.uint16)
    sums += colour[..., 1]
    sums += colour[..., 2]
    return sums


MAX_CHANNEL_SUM = 3 * 255


def sorted_channel_means(sums: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The per-pixel channel means (float64) of the masked pixels, ascending.

    Upstream averages the three channels per pixel (an exact integer sum / 3) and sorts the means; dividing
    the sorted integer sums gives the very same float64 array, and counting sort over 766 values is O(n).
    """
    counts = np.bincount(sums[mask], minlength=MAX_CHANNEL_SUM + 1)
    return np.repeat(np.arange(MAX_CHANNEL_SUM + 1), counts) / 3


def background_mean_and_std(parsing_map: np.ndarray, sums: np.ndarray) -> tuple[float, float]:
    """Mean and population std of the 5 %-95 % trimmed channel means of the top-half background (§6.4).

    ``sums`` is :func:`channel_sums` of the colour image the algorithm reads.
    """
    values = sorted_channel_means(sums[:HALF], parsing_map[:HALF] == BACKGROUND)
    n = len(values)
    if n == 0:
        return NO_BACKGROUND_MEAN, 0.0
    if n == 1:
        return float(values[0]), 0.0
    kept = values[int(0.05 * n):int(0.95 * n)]
    if len(kept) == 1:
        return float(kept[0]), 0.0
    return float(np.mean(kept)), float(np.std(kept))


def rows_with(mask: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``mask`` that hold at least one True."""
    return np.flatnonzero(mask.any(axis=1))


def row_span(mask: np.ndarray) -> int:
    """max_y - min_y over the rows that hold the class; 0 when it is absent."""
    rows = rows_with(mask)
    return int(rows[-1] - rows[0]) if len(rows) else 0


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray | None, int, int]:
    """The mask cropped to its True pixels, with the crop's top row and left column; (None, 0, 0) when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None, 0, 0
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    return mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1], top, left


def check_colour(image: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    if image.shape != (PARSING_SIZE, PARSING_SIZE, 3):
        raise PipelineError(f'{path} is {image.shape[1]}x{image.shape[0]}; the {what} must be '
                            f'{PARSING_SIZE}x{PARSING_SIZE} (the parsing map frame)')
    return image
