"""Property scores, algorithm 1 (upstream ``compute_property_scores.py``; feeds v1 through ``all_scores.csv``).

Two upstream quirks are the definition of this algorithm and are kept on purpose (R16, §6.2):
* the eyes score scans only the first 84 of the 112 rows of each eye area (absolute rows 56-139);
* the colour scores read the *original* 256x256 image resized to 224x224, which is not aligned with the
  parsing map (the map is in the face-crop frame). Algorithm 2 is the upstream's own fix.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ohlora.constants import PARSING_SIZE
from segmentation.property_scores_common import (
    ALG1_EYE_ROWS, BOTTOM_ROW, HAIR, HALF, INNER_MOUTH, LEFT_EYE, LOWER_LIP, NOSE, QUARTER, RIGHT_EYE,
    THREE_QUARTERS, UPPER_LIP, ImageScores, background_mean_and_std, bounding_box, channel_sums, read_bgr,
    row_span, rows_with, sorted_channel_means)

# Guard values (§6.5) and the names under which their hits are counted.
NO_HAIR_COLOR = 127.5
NO_HAIR_LENGTH = 0.0
FRONTAL_POSE = 0.0
GUARD_HAIR_COLOR = 'hair_color_no_hair'
GUARD_HAIR_LENGTH = 'hair_length_no_hair'
GUARD_POSE = 'pose_degenerate_nose'
GUARDS = (GUARD_HAIR_COLOR, GUARD_HAIR_LENGTH, GUARD_POSE)


def read_colour(path: str | Path) -> np.ndarray:
    """The original image as algorithm 1 reads it: OpenCV BGR, bilinearly resized to the map size."""
    image = read_bgr(path, 'original image (algorithm 1 reads its colours)')
    return cv2.resize(image, (PARSING_SIZE, PARSING_SIZE), interpolation=cv2.INTER_LINEAR)


def eyes_score(parsing_map: np.ndarray) -> float:
    scanned = slice(QUARTER, QUARTER + ALG1_EYE_ROWS)
    left = row_span(parsing_map[scanned, :THREE_QUARTERS] == LEFT_EYE)
    right = row_span(parsing_map[scanned, QUARTER:] == RIGHT_EYE)
    return (left + right) / 2


def hair_color_score(hair: np.ndarray, sums: np.ndarray) -> float | None:
    """Median channel mean of the hair pixels; None when there is no hair (upstream crashes)."""
    values = sorted_channel_means(sums, hair)
    n = len(values)
    if n == 0:
        return None
    # np.median of the sorted values: the middle one, or the mean (a + b) / 2 of the middle two.
    return float(values[n // 2]) if n % 2 else float((values[n // 2 - 1] + values[n // 2]) / 2)


def hair_length_score(hair: np.ndarray) -> float | None:
    """The last hair row, plus half the bottom row's hair pixels when hair reaches it; None without hair."""
    rows = rows_with(hair)
    if not len(rows):
        return None
    last = int(rows[-1])
    if last != BOTTOM_ROW:
        return float(last)
    left = np.count_nonzero(hair[BOTTOM_ROW, :HALF])
    right = np.count_nonzero(hair[BOTTOM_ROW, HALF:])
    return BOTTOM_ROW + (left + right) / 2


def mouth_score(parsing_map: np.ndarray) -> float:
    lips = (parsing_map == UPPER_LIP) | (parsing_map == LOWER_LIP)
    return float(row_span(lips) + row_span(parsing_map == INNER_MOUTH))


def pose_score(parsing_map: np.ndarray) -> float | None:
    """-corr(x, y) of the nose pixels; None where the correlation is undefined (upstream NaN)."""
    box, top, left = bounding_box(parsing_map == NOSE)
    if box is None:
        return None
    ys, xs = np.nonzero(box)
    ys, xs = ys + top, xs + left  # the correlation's rounding depends on the absolute coordinates
    if len(xs) < 2 or xs.min() == xs.max() or ys.min() == ys.max():
        return None
    return -pearson(xs, ys)


def pearson(xs: np.ndarray, ys: np.ndarray) -> float:
    """``np.corrcoef(xs, ys)[0][1]`` with the same operations in the same order, without its overhead.

    The covariance goes through the same BLAS product as NumPy's, so the result is identical to it (the last
    bits of either depend on the BLAS kernel of the machine).
    """
    coords = np.empty((2, len(xs)))
    coords[0], coords[1] = xs, ys
    coords -= coords.mean(axis=1)[:, None]
    cov = np.dot(coords, coords.T.conj()) * np.true_divide(1, len(xs) - 1)
    corr = cov[0, 1] / np.sqrt(cov[0, 0]) / np.sqrt(cov[1, 1])
    return float(min(max(corr, -1.0), 1.0))


def compute_scores(img_no: int, parsing_map: np.ndarray, colour: np.ndarray) -> ImageScores:
    """The seven algorithm-1 scores of one image; ``colour`` is :func:`read_colour` of its original."""
    hair = parsing_map == HAIR
    sums = channel_sums(colour)
    guards = []

    hair_color = hair_color_score(hair, sums)
    if hair_color is None:
        hair_color = NO_HAIR_COLOR
        guards.append(GUARD_HAIR_COLOR)
    hair_length = hair_length_score(hair)
    if hair_length is None:
        hair_length = NO_HAIR_LENGTH
        guards.append(GUARD_HAIR_LENGTH)
    pose = pose_score(parsing_map)
    if pose is None:
        pose = FRONTAL_POSE
        guards.append(GUARD_POSE)

    background_mean, background_std = background_mean_and_std(parsing_map, sums)
    values = (eyes_score(parsing_map), hair_color, hair_length, mouth_score(parsing_map), pose,
              background_mean, background_std)
    return ImageScores(img_no, tuple(float(v) for v in values), tuple(guards))
