"""``--amp``: inference under autocast in bfloat16, opt-in, and how a stage records it.

bfloat16 keeps float32's range (no overflow in the generators' un-normalised activations, unlike float16) and is
what CPU autocast supports; the same dtype is used on CUDA so that one measured tolerance applies
(docs/scale-out-inference.md). The numbers differ from float32 by more than float rounding, so every stage that
offers ``--amp`` records it in its settings (only when on: float32 records stay as they were) and never mixes the
two in one output folder.
"""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPE = torch.bfloat16
AMP_NAME = 'bfloat16'


def autocast(device: torch.device | str, enabled: bool):
    """The autocast context of ``--amp`` on ``device`` (a no-op context when off)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPE)


def amp_setting(enabled: bool) -> str | None:
    """What a stage's settings record says about ``--amp``: the autocast dtype, or None (left out) when off."""
    return AMP_NAME if enabled else None
