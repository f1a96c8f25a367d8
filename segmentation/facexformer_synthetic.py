"""A deterministic stand-in for the FaceXFormer weights: the rule of shared/reference/facexformer/README.md.

Every float32 entry is ``randn(shape, seeded with crc32(key))`` scaled by a per-kind rule that follows from
the key name and shape alone; the int64 ``relative_position_index`` buffers are what torchvision computes.
The official reference logits were produced with exactly these values, so tests rebuild them (under a
second) instead of storing 368 MB, and benchmarks and smoke runs get a checkpoint of the official shapes
without the 1.1 GB download. The maps it yields are not face segmentations.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from ohlora.atomic import torch_save
from segmentation.facexformer import CHECKPOINT_KEY, FaceXFormer

WINDOW = 7

# (multiplier, offset) of each random kind, in float32: value = z * multiplier + offset.
KIND_SCALE = {
    'rel_pos_bias_table': (0.5, None),
    'pe_gaussian': (1.0, None),
    'token_embedding': (1.0, None),
    'bias': (0.02, None),
    'norm_weight': (0.1, 1.0),
}


def synthetic_kind(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """The README's kind of an entry: the first rule that matches, in the README's order."""
    if dtype == torch.int64:
        return 'index'
    if key.endswith('relative_position_bias_table'):
        return 'rel_pos_bias_table'
    if key.endswith('positional_encoding_gaussian_matrix'):
        return 'pe_gaussian'
    if key.endswith('_token.weight') or key.endswith('_tokens.weight'):
        return 'token_embedding'
    if key.endswith('.bias'):
        return 'bias'
    if key.endswith('.weight') and len(shape) == 1:
        return 'norm_weight'
    if key.endswith('.weight'):
        return 'weight'
    raise ValueError(f'no synthetic-weight rule matches {key} {list(shape)}')


def relative_position_index(window: int = WINDOW) -> torch.Tensor:
    """Swin's index into the relative-position bias table: (r1−r2+w−1)·(2w−1) + (c1−c2+w−1) for cells p, q."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    d_rows = rows[:, None] - rows[None, :] + window - 1
    d_cols = cols[:, None] - cols[None, :] + window - 1
    return (d_rows * (2 * window - 1) + d_cols).flatten()


def synthetic_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    kind = synthetic_kind(key, shape, dtype)
    if kind == 'index':
        index = relative_position_index()
        if tuple(index.shape) != tuple(shape):
            raise ValueError(f'{key}: the {WINDOW}x{WINDOW} window index has {index.numel()} entries, not {list(shape)}')
        return index
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode('utf-8')))
    z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if kind == 'weight':
        fan_in = math.prod(shape) // shape[0]
        return z * (1.0 / math.sqrt(fan_in))  # the reciprocal in float64 first: the bit-exact recipe
    multiplier, offset = KIND_SCALE[kind]
    value = z * multiplier
    return value + offset if offset is not None else value


def synthetic_state_dict() -> dict[str, torch.Tensor]:
    """All 505 entries of the official model in state_dict order, by the reference rule."""
    with torch.device('meta'):
        template = FaceXFormer().state_dict()
    return {key: synthetic_tensor(key, tuple(t.shape), t.dtype) for key, t in template.items()}


def write_synthetic_checkpoint(path: str | Path) -> Path:
    """A checkpoint laid out like the published ``ckpts/model.pt`` (``{'state_dict_backbone': …}``, 369 MB)."""
    torch_save(path, {CHECKPOINT_KEY: synthetic_state_dict()})
    return Path(path)
