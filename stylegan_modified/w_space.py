"""A StyleGAN seen as two halves, z -> w and wp -> image, so that w can be sampled, recorded and edited.

The attribute directions live in w (the mapping output). Sampling needs z -> w and w -> image; editing
needs the same two halves with an edit in between, applied to all synthesis layers or a chosen range of
them. :class:`WGenerator` is that view; :class:`StyleGANW` provides it for GenForce's generator and for
the Oh-LoRA conditional generators (whose w also depends on a label: one fixed label is used for every
image, zeros by default, i.e. the mean of the z-scored training labels). Tests plug in constructed
generators with the same four members.
"""
from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch

from ohlora.errors import PipelineError

__all__ = ['WGenerator', 'StyleGANW', 'as_w_generator', 'parse_layers', 'format_layers', 'broadcast_w']


@runtime_checkable
class WGenerator(Protocol):
    z_dim: int
    w_dim: int
    num_layers: int     # synthesis layers, i.e. rows of wp

    @property
    def device(self) -> torch.device: ...

    def w(self, z: torch.Tensor) -> torch.Tensor:
        """w [N, w_dim] for z [N, z_dim]."""
        ...

    def images(self, wp: torch.Tensor) -> torch.Tensor:
        """Raw images [N, C, H, W] for wp [N, num_layers, w_dim]."""
        ...


class StyleGANW:
    """GenForce's ``StyleGANGenerator`` or an Oh-LoRA conditional generator, in eval mode, split at w.

    The synthesis uses the stored noise maps and no truncation (upstream's inference settings), so an
    image is a function of its wp. ``label`` (7 values, conditional generators only) is the label every
    z is mapped with; None means zeros.
    """

    def __init__(self, generator: torch.nn.Module, label=None):
        self.generator = generator.eval()
        self.z_dim = int(generator.z_space_dim)
        self.w_dim = int(generator.w_space_dim)
        self.num_layers = int(generator.num_layers)
        # A mismatch here comes from a file (a directions record, a generator checkpoint): one line, no traceback.
        if not generator.truncation.repeat_w:
            raise PipelineError('the generator maps z to one w per layer (repeat_w=False); attribute directions need '
                                'one w per image')
        self.label_size = int(getattr(generator, 'label_size', 0) or 0)
        if self.label_size:
            try:
                values = torch.zeros(self.label_size) if label is None else torch.as_tensor(label, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise PipelineError(f'the sampling label {label!r:.60} is not a list of numbers') from None
            if tuple(values.shape) != (self.label_size,) or not bool(torch.isfinite(values.float()).all()):
                raise PipelineError(f'the conditional generator needs a sampling label of {self.label_size} finite '
                                    f'values, got {label!r:.60}')
            self.label = values.float()
        elif label is not None:
            raise PipelineError(f'the unconditional generator takes no sampling label, got {label!r:.60}')
        else:
            self.label = None

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.inference_mode()
    def w(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.device, torch.float32)
        if self.label is None:
            return self.generator.mapping(z)['w']
        label = self.label.to(self.device).expand(z.shape[0], -1)
        return self.generator.mapping(z, label)['w']

    @torch.inference_mode()
    def images(self, wp: torch.Tensor) -> torch.Tensor:
        return self.generator.synthesis(wp.to(self.device, torch.float32), randomize_noise=False)['image']


def as_w_generator(generator, label=None) -> WGenerator:
    """``generator`` itself if it already is a :class:`WGenerator`, else its :class:`StyleGANW` view."""
    if isinstance(generator, WGenerator) and not isinstance(generator, torch.nn.Module):
        return generator
    return StyleGANW(generator, label)


def broadcast_w(w: torch.Tensor, num_layers: int) -> torch.Tensor:
    """wp [N, num_layers, w_dim] with every layer's code equal to w (what truncation with psi 1 does)."""
    return w.unsqueeze(1).expand(-1, num_layers, -1).contiguous()


_RANGE = re.compile(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?')


def parse_layers(value, num_layers: int, option: str = '--layers') -> tuple[int, int]:
    """(first, last) synthesis layers, inclusive, of ``'all'``/None, ``'K'``, ``'A-B'`` or a (first, last) pair."""
    if value is None or (isinstance(value, str) and value.strip().lower() == 'all'):
        return 0, num_layers - 1
    if isinstance(value, str):
        match = _RANGE.fullmatch(value)
        if not match:
            raise PipelineError(f"{option} {value!r} is not a layer range; write 'all', a layer K or a range A-B "
                                f'(layers 0..{num_layers - 1})')
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
    else:
        try:
            first, last = (int(v) for v in value)
        except (TypeError, ValueError):
            raise PipelineError(f'{option} {value!r} is not a (first, last) layer pair') from None
    if first > last:
        raise PipelineError(f'{option} {first}-{last}: the first layer is after the last (first > last); write the '
                            f'range as {last}-{first}')
    if not 0 <= first <= last < num_layers:
        raise PipelineError(f'{option} {first}-{last} is outside the generator\'s layers 0..{num_layers - 1}')
    return first, last


def format_layers(layers: tuple[int, int], num_layers: int) -> str:
    first, last = layers
    return 'all' if (first, last) == (0, num_layers - 1) else f'{first}-{last}'
