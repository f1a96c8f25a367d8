"""Property scores, algorithm 2 (upstream ``compute_property_scores_v2.py``; feeds v2/v3/v4 via ``all_scores_v2.csv``).

The colours come from the face crop that is pixel-aligned with the parsing map (§6.3). The "pose" score is
the slope of the line joining the two eye centroids, i.e. an in-plane roll, not yaw (R16).

The upstream eyes score searches the farthest pair of eye pixels over all O(n^2) pairs. Here only the top
and bottom pixel of each column are paired: both ends of a farthest pair are vertices of the convex hull, and
a pixel strictly between two others of its column is never a vertex. The squared distances are exact
integers and the candidates keep the upstream enumeration order, so the upstream tie rule (the first pair
found in its scan order) is kept exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segmentation.property_scores_common import (
    BOTTOM_ROW, HAIR, HALF, INNER_MOUTH, LEFT_EYE, LOWER_LIP, QUARTER, RIGHT_EYE, THREE_QUARTERS, UPPER_LIP,
    ImageScores, background_mean_and_std, bounding_box, channel_sums, sorted_channel_means)

MIN_HAIR_PIXELS = 20         # MIN_HAIR_PIXEL_THRESHOLD: a row with fewer hair pixels does not count
BOTTOM_ROW_OFFSET = MIN_HAIR_PIXELS // 2
NO_HAIR_COLOR = 127.5        # upstream's own fallback (no hair, or nothing left after trimming)
LEVEL_POSE = 0.0             # guard for equal eye-centroid x (§6.5); upstream also uses 0.0 for a missing eye
GUARD_POSE = 'pose_equal_eye_x'
GUARDS = (GUARD_POSE,)


def eye_area(parsing_map: np.ndarray, eye: int) -> tuple[np.ndarray, int]:
    """One eye's search area as a mask (rows 56-167; columns 0-167 left, 56-223 right) and its column offset."""
    if eye == LEFT_EYE:
        return parsing_map[QUARTER:THREE_QUARTERS, :THREE_QUARTERS] == LEFT_EYE, 0
    return parsing_map[QUARTER:THREE_QUARTERS, QUARTER:] == RIGHT_EYE, QUARTER


@dataclass(frozen=True)
class EyeShape:
    height: int                          # the largest per-column extent max_y - min_y
    cos: float                           # |dx| / length of the farthest pixel pair (1.0 below two pixels)
    centroid: tuple[float, float] | None  # (mean y, mean x) in map coordinates; None without pixels


def eye_shape(area: np.ndarray, column_offset: int) -> EyeShape:
    """Height, tilt cosine and centroid of one eye from its search-area mask (§6.3)."""
    box, top, left = bounding_box(area)
    if box is None:
        return EyeShape(0, 1.0, None)
    rows, cols = box.shape
    per_column = np.count_nonzero(box, axis=0)
    per_row = np.count_nonzero(box, axis=1)
    n = int(per_column.sum())
    present = np.flatnonzero(per_column)
    first = box.argmax(axis=0)[present]
    last = rows - 1 - box[::-1].argmax(axis=0)[present]
    height = int((last - first).max())
    # Integer coordinate sums are exact in float64: the same means as np.mean over the pixel lists.
    centroid = (int(per_row @ np.arange(top + QUARTER, top + QUARTER + rows)) / n,
                int(per_column @ np.arange(left + column_offset, left + column_offset + cols)) / n)
    if n < 2:
        return EyeShape(height, 1.0, centroid)
    # Farthest-pair candidates: the top and bottom pixel of every column, columns left to right. They include
    # every convex-hull vertex, and they come in upstream's column-major enumeration order.
    ys = np.stack((first, last), axis=1).ravel()
    xs = np.repeat(present, 2)
    return EyeShape(height, farthest_pair_cos(ys, xs), centroid)


def farthest_pair_cos(ys: np.ndarray, xs: np.ndarray) -> float:
    """|dx| / distance of the farthest pair of pixels, chosen by the upstream tie rule.

    Upstream enumerates the eye's pixels column by column (x outer, y inner), scans i = 0..n-1, j = 0..i-1
    and keeps a pair only when its squared distance is strictly larger than the best so far, so among the
    farthest pairs the smallest i, then the smallest j wins. ``ys``/``xs`` may be any subset of the pixels
    that contains both ends of every farthest pair, in that enumeration order (a pixel may repeat in place).
    The first maximum of the lower triangle in row-major order is then the same pair.
    """
    ys, xs = ys.astype(np.int64), xs.astype(np.int64)
    dist2 = np.tril((ys[:, None] - ys) ** 2 + (xs[:, None] - xs) ** 2, -1)
    i, j = divmod(int(dist2.argmax()), len(ys))
    dx, dy = int(xs[i] - xs[j]), int(ys[i] - ys[j])
    return abs(dx) / math.sqrt(dx * dx + dy * dy)


def eyes_and_pose_scores(parsing_map: np.ndarray) -> tuple[float, float, bool]:
    """(eyes, pose, guarded): the tilt-corrected eye height and the eye-centroid slope (§6.3)."""
    left = eye_shape(*eye_area(parsing_map, LEFT_EYE))
    right = eye_shape(*eye_area(parsing_map, RIGHT_EYE))
    eyes = float(max(left.height * left.cos, right.height * right.cos))
    if left.centroid is None or right.centroid is None:
        return eyes, LEVEL_POSE, False
    dx = right.centroid[1] - left.centroid[1]
    if dx == 0:
        return eyes, LEVEL_POSE, True  # upstream: +-inf or NaN
    return eyes, (right.centroid[0] - left.centroid[0]) / dx, False


def hair_color_score(hair: np.ndarray, sums: np.ndarray) -> float:
    """Mean of the 10 %-90 % slice of the sorted hair channel means; 127.5 when that slice is empty."""
    values = sorted_channel_means(sums, hair)
    n = len(values)
    kept = values[int(0.1 * n):int(0.9 * n)]
    return float(np.mean(kept)) if len(kept) else NO_HAIR_COLOR


def hair_length_score(hair: np.ndarray) -> float:
    """Rows 56-223 with >= 20 hair pixels, plus a thresholded extension when the bottom row qualifies."""
    per_row = np.count_nonzero(hair, axis=1)
    length = int((per_row[QUARTER:] >= MIN_HAIR_PIXELS).sum())
    if per_row[BOTTOM_ROW] < MIN_HAIR_PIXELS:
        return float(length)
    left = np.count_nonzero(hair[BOTTOM_ROW, :HALF])
    right = np.count_nonzero(hair[BOTTOM_ROW, HALF:])
    return length + max(left - BOTTOM_ROW_OFFSET, 0) / 2 + max(right - BOTTOM_ROW_OFFSET, 0) / 2


def mouth_score(parsing_map: np.ndarray) -> float:
    """Inner-mouth share of the mouth pixels (lips + inner mouth); 0 without any."""
    inner = np.count_nonzero(parsing_map == INNER_MOUTH)
    total = np.count_nonzero(parsing_map == UPPER_LIP) + inner + np.count_nonzero(parsing_map == LOWER_LIP)
    return inner / total if total else 0.0


def compute_scores(img_no: int, parsing_map: np.ndarray, face: np.ndarray) -> ImageScores:
    """The seven algorithm-2 scores of one image; ``face`` is its 224x224 BGR face crop."""
    hair = parsing_map == HAIR
    sums = channel_sums(face)
    eyes, pose, pose_guarded = eyes_and_pose_scores(parsing_map)
    background_mean, background_std = background_mean_and_std(parsing_map, sums)
    values = (eyes, hair_color_score(hair, sums), hair_length_score(hair), mouth_score(parsing_map), pose,
              background_mean, background_std)
    return ImageScores(img_no, tuple(float(v) for v in values), (GUARD_POSE,) if pose_guarded else ())
