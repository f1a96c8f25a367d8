"""Generated images as the pipeline delivers them, for every instrument that scores them.

Stages 1 and 6 write a generator's output through GenForce's uint8 conversion (round half up, in float64) and
OpenCV's JPEG (quality 95, RGB -> BGR); the evaluation measures those pixels decoded again with OpenCV, and the
property CNN reads them as ``uint8 / 127.5 - 1``. The direction sampler scores the same pixels the same way, so
the scores its directions are fitted on and the scores the evaluation measures differ by the image only, never
by its format (the raw float output moves property-CNN scores by a few hundredths against the JPEG).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from ohlora import atomic
from ohlora.layout import IMAGE_SUFFIX
from stylegan.postprocess import to_uint8_tensor

ENCODING = 'GenForce uint8 (round half up), OpenCV JPEG quality 95 from RGB->BGR, decoded with OpenCV'
CNN_INPUT = 'uint8 / 127.5 - 1'
JPEG_WORKERS = 4  # OpenCV's coders release the GIL


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """The JPEG bytes stages 1 and 6 write for a uint8 RGB image."""
    return atomic.encode_image(IMAGE_SUFFIX, np.ascontiguousarray(rgb[:, :, ::-1]))


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """uint8 RGB pixels of JPEG bytes as OpenCV decodes them; None if they are not an image."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else np.ascontiguousarray(image[:, :, ::-1])


def delivered(images: torch.Tensor, workers: int = JPEG_WORKERS) -> np.ndarray:
    """uint8 RGB NHWC pixels of raw NCHW generator images after the uint8 conversion and the JPEG round trip."""
    rgb = to_uint8_tensor(images).cpu().numpy()
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rgb)))) as pool:
        return np.stack(list(pool.map(lambda image: decode_jpeg(encode_jpeg(image)), rgb)))


def cnn_input(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """The property CNN's input, float32 NCHW on ``device``, from uint8 RGB NHWC pixels (as in its training:
    ToTensor + Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
