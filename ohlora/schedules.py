"""Cosine learning-rate schedules stepped once per epoch (or per step group), shared by every trainer.

Upstream used ``CosineAnnealingLR(T_max=10, eta_min=0)`` and kept stepping it past T_max (R10). The LR then
follows cos(pi * t / T_max) through a full period of 2 * T_max: it is exactly 0 in epochs 10, 30, 50, ...,
epochs that change nothing but still count towards early-stopping patience.

``'restarts'`` (the project default) restarts the cosine every ``period`` epochs instead: the same LRs as
upstream in epochs 0 .. period-1, never 0. ``'upstream'`` reproduces the original curve (``--compat upstream``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

SCHEDULES = ('restarts', 'upstream')
DEFAULT_SCHEDULE = 'restarts'
UPSTREAM_PERIOD = 10  # CosineAnnealingLR T_max of the CNNs, the property CNN and v3


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be one of {SCHEDULES}, not {schedule!r}')
    return schedule


def cosine_lr(base_lr: float, epoch: int, period: int = UPSTREAM_PERIOD, schedule: str = DEFAULT_SCHEDULE) -> float:
    """The LR of 0-based ``epoch``: ``base_lr`` times the cosine factor (eta_min 0)."""
    check_schedule(schedule)
    if period < 1 or epoch < 0:
        raise ValueError(f'period must be at least 1 and epoch at least 0, not {period} and {epoch}')
    phase = epoch if schedule == 'upstream' else epoch % period
    # This exact expression (base_lr * (...) / 2) is what stage 2 has always computed; keep it bit-identical.
    return base_lr * (1.0 + math.cos(math.pi * phase / period)) / 2.0


def lr_factor(epoch: int, period: int = UPSTREAM_PERIOD, schedule: str = DEFAULT_SCHEDULE) -> float:
    """The multiplier of every base LR in 0-based ``epoch``: 1 at epoch 0, in [0, 1]."""
    return cosine_lr(1.0, epoch, period, schedule)


def set_epoch_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], epoch: int,
                 period: int = UPSTREAM_PERIOD, schedule: str = DEFAULT_SCHEDULE) -> list[float]:
    """Set each param group's LR to ``cosine_lr(base, epoch)``, e.g. v3's two groups (G 1e-4, encoder 1e-5)."""
    groups = optimizer.param_groups
    if len(base_lrs) != len(groups):
        raise ValueError(f'{len(base_lrs)} base LRs for {len(groups)} param groups')
    lrs = [cosine_lr(base, epoch, period, schedule) for base in base_lrs]
    for group, lr in zip(groups, lrs):
        group['lr'] = lr
    return lrs
