"""Monitoring snapshots of a conditional generator during training: a fixed grid, rows = seeded z, columns =
label rows (by default the 7 rows of upstream's v1 fine-tuning, PIPELINE.md §7.2).

Upstream rendered 10 ``np.random.normal`` z x 7 labels with G still in train mode (style mixing 0.9), so its
snapshots were not comparable from one to the next and consumed training randomness. Here the grid is made
in eval mode (no style mixing, no ``w_avg`` update), with the stored noise maps and no truncation, under
``no_grad``, and the z come from their own RNG (:func:`ohlora.devices.item_generator`): a snapshot draws
nothing from the global RNGs, so taking snapshots (or not) never changes what training draws, and the same
weights always give the same PNG. The generator's train/eval mode is restored afterwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ohlora import atomic
from ohlora.constants import PROPERTY_NAMES
from ohlora.devices import item_generator
from stylegan.postprocess import to_uint8
from stylegan_modified.sweep_grid import sweep_grid

MONITOR_STREAM = 60  # item_generator stream of the snapshot z's

# Upstream's 7 monitoring labels: from all-high eyes/hair on, one attribute changes per column.
UPSTREAM_LABEL_ROWS = (
    (1.5, 1.5, 1.1, -1.1, -1.2, 1.2, -1.0),
    (-1.5, 1.5, 1.1, -1.1, -1.2, 1.2, -1.0),
    (-1.5, -1.5, 1.1, -1.1, -1.2, 1.2, -1.0),
    (-1.5, -1.5, -2.0, -1.1, -1.2, 1.2, -1.0),
    (-1.5, -1.5, -2.0, 1.8, -1.2, 1.2, -1.0),
    (-1.5, -1.5, -2.0, 1.8, 2.0, 1.2, -1.0),
    (-1.5, -1.5, -2.0, 1.8, 2.0, -1.6, -1.0),
)


def column_labels(rows: Sequence[Sequence[float]], names: Sequence[str] = PROPERTY_NAMES) -> list[str]:
    """Short column titles: the first row as 'start', then the attribute(s) that changed from the previous row."""
    labels = ['start']
    for previous, row in zip(rows, rows[1:]):
        changed = [f'{names[k]} {row[k]:g}' for k in range(len(row)) if row[k] != previous[k]]
        labels.append(', '.join(changed) or 'same')
    return labels


class MonitoringGrid:
    """``num_z`` seeded z (rows) x ``label_rows`` (columns), cells ``cell_size`` pixels wide."""

    def __init__(self, z_dim: int, seed: int, num_z: int = 10, label_rows=UPSTREAM_LABEL_ROWS, cell_size: int = 128,
                 chunk: int = 14):
        self.z = torch.stack([torch.randn(z_dim, generator=item_generator(seed, r, MONITOR_STREAM))
                              for r in range(num_z)])
        self.labels = torch.tensor(np.asarray(label_rows, dtype=np.float32))
        self.cell_size = cell_size
        self.chunk = chunk
        self.column_titles = column_labels(np.asarray(label_rows, dtype=np.float32).tolist())

    def render(self, generator: torch.nn.Module, title: str) -> np.ndarray:
        """The grid as a BGR uint8 image (for OpenCV); the generator's mode is left as it was."""
        device = next(generator.parameters()).device
        rows, cols = len(self.z), len(self.labels)
        z = self.z.repeat_interleave(cols, dim=0)
        labels = self.labels.repeat(rows, 1)
        was_training = generator.training
        generator.eval()
        try:
            with torch.no_grad():
                images = [to_uint8(generator(z[k:k + self.chunk].to(device), labels[k:k + self.chunk].to(device),
                                             trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image'])
                          for k in range(0, len(z), self.chunk)]
        finally:
            generator.train(was_training)
        images = np.concatenate(images)
        return sweep_grid(lambda r, c: self._cell(images[r * cols + c]), [f'z {r}' for r in range(rows)],
                          self.column_titles, title)

    def _cell(self, rgb: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if bgr.shape[0] == self.cell_size:
            return bgr
        return cv2.resize(bgr, (self.cell_size, self.cell_size), interpolation=cv2.INTER_AREA)

    def write(self, generator: torch.nn.Module, path: str | Path, title: str) -> None:
        atomic.write_image(path, self.render(generator, title))
