"""GenForce's ``postprocess_image``: float images in [-1, 1] -> uint8 NHWC RGB, and the check that comes before it."""
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


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8` on the images' own device (a GPU keeps the batch; only the uint8 pixels travel): uint8
    NHWC tensor, bit for bit what :func:`to_uint8` returns (the same float64 steps, each correctly rounded)."""
    if images.ndim != 4:
        raise ValueError(f'expected NCHW images, got shape {list(images.shape)}')
    if images.device.type == 'mps':  # no float64 there
        images = images.cpu()
    values = (images.detach().to(torch.float64) + 1.0) * 255.0 / 2.0 + 0.5
    return values.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def require_finite(images: torch.Tensor, img_nos: list[int], hint: str) -> None:
    """Refuse a batch with NaN or infinite pixels before it is written: the uint8 conversion would turn them into
    plausible-looking black or saturated images."""
    bad = ~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
    if bool(bad.any()):
        from ohlora.errors import PipelineError

        first = img_nos[int(bad.nonzero()[0, 0])]
        raise PipelineError(f'the generator gave NaN or infinite pixels for image {first} ({int(bad.sum())} of '
                            f'{len(img_nos)} in its batch); nothing of that batch was written; {hint}')
