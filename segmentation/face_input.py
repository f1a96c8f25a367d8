"""The 224x224 face crop in the parser's input form, and back (PIPELINE.md §5, MODELS.md §7.4-7.5).

Each step is the upstream one with the same float32 arithmetic, because two outputs depend on it bit for
bit: the parser input (torchvision ``ToTensor`` + ``Normalize``) and ``face_NNNNNN.png``, whose
``astype(uint8)`` truncation sits right at integer boundaries (algorithm 2 of stage 4 reads its colours).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ohlora.constants import PARSING_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def resized_crop(image: Image.Image, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """Pillow crop (no padding, no squaring) then Pillow bicubic to 224x224 -> H×W×3 uint8 RGB."""
    face = image.crop(crop_box).resize((PARSING_SIZE, PARSING_SIZE), Image.BICUBIC)
    return np.array(face, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def normalize(faces_uint8: np.ndarray) -> torch.Tensor:
    """B×H×W×3 (or H×W×3) uint8 RGB -> B×3×H×W float32, as ``ToTensor`` then ``Normalize`` (÷255, −mean, ÷std)."""
    x = torch.from_numpy(np.ascontiguousarray(faces_uint8))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div(255)
    return (x - _MEAN).div(_STD)


def face_png_pixels(inputs: torch.Tensor) -> np.ndarray:
    """B×3×H×W normalised input -> B×H×W×3 uint8 RGB: clamp(x·std + mean, 0, 1)·255, truncated as upstream.

    About 15 % of the values come out 1 lower than the resized crop; stage 4 expects exactly that.
    """
    x = inputs.detach().to('cpu', torch.float32)
    x = (x * _STD + _MEAN).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
