"""One small interface for "a generator whose attributes can be requested": (z, requested values) -> images.

The evaluation tool (what does a generator really control?) and stage 6 work through it, so every way of
controlling attributes plugs in the same way: the conditional generators v1/v2/v3 (the label is an input of
the mapping network), and the attribute directions in w (the requested values move w along fitted
directions). A new method implements :class:`ControllableGenerator` and nothing else changes.

Values are z-scores in the standard order (``ohlora.layout.PROPERTY_NAMES``), in the label space of the
generator (``score_algorithm``: 1 for v1, 2 for v2/v3 and the directions, whose scores come from the
algorithm-2 property CNN). Images are the raw generator output (RGB, about [-1, 1], N x 3 x H x W); convert
with :func:`stylegan.postprocess.to_uint8` to write them.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ohlora.constants import PROPERTY_NAMES

__all__ = ['ControllableGenerator', 'ConditionalControl', 'TRAINED_ATTRIBUTES', 'SCORE_ALGORITHM']

# What each conditional variant was trained to control, and in which score space its labels live (stage 4).
TRAINED_ATTRIBUTES = {'v1': PROPERTY_NAMES, 'v2': PROPERTY_NAMES[:6], 'v3': ('eyes', 'mouth', 'pose')}
SCORE_ALGORITHM = {'v1': 1, 'v2': 2, 'v3': 2}


@runtime_checkable
class ControllableGenerator(Protocol):
    name: str                              # e.g. 'v3', 'directions', for messages and records
    z_dim: int                             # width of the z it takes
    score_algorithm: int                   # property-score algorithm of the requested values (1 or 2)
    trained_attributes: tuple[str, ...]    # attributes it was built to control; others are ignored or warned

    @property
    def device(self) -> torch.device: ...

    def images(self, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Raw RGB images [N, 3, H, W] for z [N, z_dim] and requested values [N, 7] (standard order)."""
        ...


class ConditionalControl:
    """A conditional Oh-LoRA generator (v1/v2/v3): the requested values are its label.

    Inference settings are upstream's ``G_kwargs_val`` (no truncation, the stored noise maps); the generator
    is put in eval mode, so v1 does no style mixing and the images are a function of (z, label).
    """

    def __init__(self, generator: torch.nn.Module, variant: str):
        if variant not in TRAINED_ATTRIBUTES:
            raise ValueError(f'unknown conditional variant {variant!r}; choose one of {", ".join(TRAINED_ATTRIBUTES)}')
        self.generator = generator.eval()
        self.name = variant
        self.z_dim = int(generator.z_space_dim)
        self.score_algorithm = SCORE_ALGORITHM[variant]
        self.trained_attributes = tuple(TRAINED_ATTRIBUTES[variant])

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.inference_mode()
    def images(self, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        device = self.device
        return self.generator(z.to(device), values.to(device), trunc_psi=1.0, trunc_layers=0,
                              randomize_noise=False)['image']
