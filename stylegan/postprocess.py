"""GenForce's ``postprocess_image``: float images in [-1, 1] -> uint8 NHWC RGB."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """NCHW float images (nominally [-1, 1], unclamped) -> uint8 NHWC, RGB order kept.

    As GenForce: in float64, v = (x + 1) * 255 / 2 + 0.5, clipped to [0, 255] and truncated, i.e.
    round-half-up. Doing it in float32 moves a few values by one level.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().to('cpu', torch.float64).numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f'expected NCHW images, got shape {list(images.shape)}')
    values = (images + 1.0) * 255.0 / 2.0 + 0.5
    return np.clip(values, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
