"""A labelled image grid (rows = z, columns = values of one attribute), drawn with OpenCV so it is byte-stable."""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
GAP = 4          # pixels between cells
LEFT = 96        # width of the row-label column
TITLE_H = 28     # height of the title line
HEADER_H = 26    # height of the column-label line
INK = (0, 0, 0)
PAPER = 255


def _fit(text: str, width: int, scale: float = 0.55, min_scale: float = 0.35) -> tuple[str, float]:
    """The text and a font scale at which it fits ``width`` pixels, shortened with '…' if it never does."""
    while scale > min_scale and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        scale -= 0.05
    while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = text[:-4] + '...'
    return text, scale


def _put(canvas: np.ndarray, text: str, x: int, y: int, width: int, centred: bool = True) -> None:
    """Draw ``text`` with its baseline at ``y``, centred in [x, x + width) (or left-aligned)."""
    text, scale = _fit(text, width)
    text_w = cv2.getTextSize(text, FONT, scale, 1)[0][0]
    left = x + (width - text_w) // 2 if centred else x
    cv2.putText(canvas, text, (left, y), FONT, scale, INK, 1, cv2.LINE_AA)


def sweep_grid(cells: Callable[[int, int], np.ndarray] | Sequence[Sequence[np.ndarray]], row_labels: list[str],
               column_labels: list[str], title: str) -> np.ndarray:
    """The cells (equal-size uint8 HxWx3 images, BGR or RGB alike) laid out with a title and labels, in the cells'
    channel order. ``cells`` is ``cells[row][column]``, or a function ``cells(row, column)`` that is asked for
    each cell once, when it is placed, so a caller can decode (or render) one at a time instead of holding all."""
    cell = cells if callable(cells) else (lambda r, c: cells[r][c])
    rows, cols = len(row_labels), len(column_labels)
    first = cell(0, 0)
    height, width = first.shape[:2]
    top = TITLE_H + HEADER_H
    canvas = np.full((top + rows * (height + GAP), LEFT + cols * (width + GAP), 3), PAPER, dtype=np.uint8)
    _put(canvas, title, 6, TITLE_H - 9, canvas.shape[1] - 12, centred=False)
    for c, label in enumerate(column_labels):
        _put(canvas, label, LEFT + c * (width + GAP), TITLE_H + HEADER_H - 9, width)
    for r in range(rows):
        y = top + r * (height + GAP)
        _put(canvas, row_labels[r], 4, y + height // 2 + 5, LEFT - 8)
        for c in range(cols):
            x = LEFT + c * (width + GAP)
            canvas[y:y + height, x:x + width] = first if r == c == 0 else cell(r, c)
    return canvas
