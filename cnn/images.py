"""Streaming the stage-1 JPEGs into the CNNs exactly as upstream reads them.

Upstream reads with ``torchvision.io.read_image`` (uint8 RGB, C x H x W) and converts with
``ToPILImage`` + ``ToTensor``, i.e. ``uint8 / 255`` in [0, 1] without mean/std normalisation. This module
decodes with torchvision too (same libjpeg, same pixels) and divides by 255 on the device, so workers ship
uint8 (4x less to copy). Images are read per batch by a DataLoader; nothing holds the whole set.

An image that cannot be decoded, or has the wrong size, is dropped from its batch and reported with a reason,
so one bad file does not stop a 10,000-image run.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file

from ohlora.constants import IMAGE_SIZE
from ohlora.errors import first_line
from ohlora.records import sha256_bytes

IMAGE_HW = (IMAGE_SIZE, IMAGE_SIZE)  # what both published CNNs were trained on
DECODER_DEPRECATION = 'The image decoding and encoding capabilities of TorchVision'


def read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, as ``torchvision.io.read_file`` gives them to the decoder."""
    with warnings.catch_warnings():  # see decode_rgb
        warnings.filterwarnings('ignore', message=DECODER_DEPRECATION, category=DeprecationWarning)
        return read_file(str(path))


def decode_rgb(source: Path | torch.Tensor) -> torch.Tensor:
    """uint8 RGB, 3 x H x W, as ``torchvision.io.read_image`` gives it (grey or RGBA files become RGB), of a file
    or of its bytes (from :func:`read_bytes`)."""
    data = source if isinstance(source, torch.Tensor) else read_bytes(source)
    # torchvision >= 0.29 warns on every call that its decoders move to TorchCodec; they are still the
    # decoders upstream used, and one warning per image would bury the real messages.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=DECODER_DEPRECATION, category=DeprecationWarning)
        return decode_image(data, mode=ImageReadMode.RGB)


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], the ``ToTensor`` conversion the CNNs were trained with."""
    return images_uint8.float().div(255)


@dataclass
class ImageBatch:
    img_nos: list[int]
    images: torch.Tensor                       # uint8, N x 3 x H x W (N may be 0)
    labels: torch.Tensor | None                # float32, N, when the dataset has labels
    failed: list[tuple[int, str]] = field(default_factory=list)  # (img_no, reason) dropped from this batch
    digests: list[str] = field(default_factory=list)             # SHA-256 of each image's file, as read

    def pin_memory(self) -> 'ImageBatch':  # called by DataLoader(pin_memory=True) in its pinning thread
        labels = None if self.labels is None else self.labels.pin_memory()
        return ImageBatch(self.img_nos, self.images.pin_memory(), labels, self.failed, self.digests)


class ImageFiles(Dataset):
    """(img_no, path[, label]) items read lazily; a failed read yields a reason instead of pixels."""

    def __init__(self, img_nos: Sequence[int], paths: Sequence[Path], labels: np.ndarray | None = None,
                 size: tuple[int, int] | None = IMAGE_HW):
        if len(img_nos) != len(paths) or (labels is not None and len(labels) != len(paths)):
            raise ValueError('img_nos, paths and labels must have the same length')
        self.img_nos = [int(n) for n in img_nos]
        self.paths = [Path(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        """(img_no, uint8 image or None, label, reason or None, SHA-256 of the bytes decoded or None)."""
        label = None if self.labels is None else float(self.labels[index])
        path = self.paths[index]
        try:
            data = read_bytes(path)
            image = decode_rgb(data)
        except (RuntimeError, OSError, ValueError) as exc:
            reason = first_line(exc, 120)
            return self.img_nos[index], None, label, f'unreadable image {path.name}: {reason}', None
        if self.size is not None and tuple(image.shape[-2:]) != tuple(self.size):
            height, width = image.shape[-2:]
            return (self.img_nos[index], None, label,
                    f'{path.name} is {width}x{height}, the CNNs need {self.size[1]}x{self.size[0]}', None)
        # The digest of the very bytes decoded: a score then belongs to that content, whatever happens to the file.
        return self.img_nos[index], image, label, None, sha256_bytes(data.numpy().tobytes())


def collate(items) -> ImageBatch:
    good = [item for item in items if item[1] is not None]
    failed = [(item[0], item[3]) for item in items if item[1] is None]
    images = torch.stack([item[1] for item in good]) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    labels = None
    if items and items[0][2] is not None:
        labels = torch.tensor([item[2] for item in good], dtype=torch.float32)
    return ImageBatch([item[0] for item in good], images, labels, failed, [item[4] for item in good])


def image_loader(dataset: ImageFiles, batch_size: int, device: torch.device, workers: int = 0,
                 sampler: Sampler | None = None, persistent: bool = False) -> DataLoader:
    """Batches in dataset order (or the sampler's), decoded by ``workers`` background processes."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=device.type == 'cuda',
                      persistent_workers=persistent and workers > 0)
