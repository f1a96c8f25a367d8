"""The one resume record of every trainer (stage 5 v1, v2, v3, ...): everything an interrupted run needs to
continue exactly where it stopped (R14).

A record is written atomically as one file (the commit point of a checkpoint) and holds only tensors and
plain Python values, so it loads with ``torch.load(weights_only=True)`` (R11):

* ``options``: the resolved options of the run (plain JSON types), compared on ``--resume``;
* ``epoch``, ``batch``, ``step``: the 0-based epoch in progress, the batches of it already done, and the
  optimiser steps (batches) done in all. ``batch == 0`` means the epoch has not started, so
  ``epoch`` is then the number of finished epochs;
* ``data_order``: the permutation of the dataset for the epoch in progress (int64 tensor), None between epochs;
* ``rng``: every global random stream training draws from (:func:`capture_rng_state`): torch's CPU generator,
  every CUDA generator, NumPy's global RNG (GenForce's style mixing draws its decision and cutoff from it) and
  Python's ``random``. A run of several processes (torchrun) keeps every rank's streams, in rank order, under
  ``rng['ranks']`` (rank 0's also at the top level): :func:`capture_rank_rng_states`,
  :func:`restore_rank_rng_state`;
* ``models``, ``optimizers``, ``scalers``: ``{name: state_dict()}`` of the networks, their optimisers and
  their AMP GradScalers;
* ``extra``: trainer-specific plain values (counters, best scores, ...); ``extra[STOPPED_EARLY]`` marks a run that
  early stopping has finished before its epoch cap.

Typical use in a trainer::

    record = load_resume_record(path)                        # or None for a fresh run
    check_resume_options(record.options, options, path)      # one line naming what changed
    model.load_state_dict(record.models['G']); optimizer.load_state_dict(record.optimizers['G'])
    restore_rng_state(record.rng)
    ...
    save_resume_record(path, ResumeRecord(options, epoch, batch, step, order, capture_rng_state(), ...))

Only the options in :data:`RESUMABLE_OPTIONS` may change on resume (e.g. ``--epochs``, the total, to extend a
finished run); every other difference is refused, because the continued run would no longer be the run it
claims to continue. ``world_size`` (the number of torchrun processes) and ``tf32`` may change too: the run
continues, but not bit-exactly as it would have with the recorded value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ohlora import atomic
from ohlora.checkpoints import read_checkpoint
from ohlora.devices import item_generator
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.records import flatten_settings

FORMAT = 'ohlora-resume-record'
VERSION = 1
# tf32 may change like device: it changes float rounding on a GPU (a continued run is correct, not bit-exact) and
# nothing on a CPU.
RESUMABLE_OPTIONS = ('epochs', 'device', 'workers', 'no_progress', 'world_size', 'tf32')
# How a refusal names an option that is not spelled ``--`` + its key.
OPTION_NAMES = {'world_size': 'the number of processes'}
RANK_SEED_STREAM, RANK_RESUME_STREAM = 52, 53  # item_generator streams: the seeds of ranks 1, 2, ...
# ``extra`` key of a trainer with early stopping: True once the run stopped before its epoch cap, so it is finished
# whatever the cap (a larger cap would not make it train on: its patience is used up).
STOPPED_EARLY = 'stopped_early'


def capture_rng_state() -> dict:
    """Every global RNG stream as tensors and lists (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        'torch_cpu': torch.get_rng_state(),
        # Only a run that used CUDA has CUDA streams to keep (and asking would create a CUDA context).
        'torch_cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
        'python': {'version': version, 'internal': list(internal), 'gauss_next': gauss_next},
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Set every global RNG stream back to ``state`` (from :func:`capture_rng_state`).

    CUDA streams are restored for the devices present now; a run resumed on another device continues with
    correctly restored CPU, NumPy and Python streams (exact resume is promised on the same device only).
    """
    torch.set_rng_state(state['torch_cpu'])
    cuda = state.get('torch_cuda') or []
    if cuda and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy = state['numpy']
    np.random.set_state((numpy['kind'], numpy['keys'].numpy().astype(np.uint32), numpy['pos'], numpy['has_gauss'],
                         numpy['cached_gaussian']))
    python = state['python']
    random.setstate((python['version'], tuple(python['internal']), python['gauss_next']))


def seed_everything(seed: int) -> None:
    """Seed every global stream of :func:`capture_rng_state` from one number (the start of a fresh run)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s global streams: ``seed`` itself for rank 0 (so one process is the run it
    always was), one drawn from (seed, rank) for the others (their z, noise and dropout must differ)."""
    return seed if rank == 0 else item_generator(seed, rank, RANK_SEED_STREAM).initial_seed()


def capture_rank_rng_states(ctx: DistContext) -> dict:
    """:func:`capture_rng_state`; with several processes every rank's, gathered (a collective: every rank calls
    it) under ``'ranks'`` in rank order, rank 0's also at the top level (what a single process restores)."""
    state = capture_rng_state()
    if not ctx.distributed:
        return state
    states = ctx.all_gather_objects(state)
    return {**states[0], 'ranks': states}


def recorded_world_size(state: dict) -> int:
    """The number of processes whose streams ``state`` (a record's ``rng``) holds."""
    return len(state['ranks']) if state.get('ranks') else 1


def restore_rank_rng_state(state: dict, ctx: DistContext, seed: int, step: int) -> None:
    """Each rank restores its own streams from a record's ``rng``. With another number of processes than the
    record's, a rank the record does not know starts from a seed drawn from (seed, rank, step): the run continues,
    but not bit-exactly as it would have with the recorded number."""
    ranks = state.get('ranks') or [state]
    if ctx.rank < len(ranks):
        restore_rng_state(ranks[ctx.rank])
    else:
        seed_everything(item_generator(rank_seed(seed, ctx.rank), step, RANK_RESUME_STREAM).initial_seed())


@dataclass
class ResumeRecord:
    """The state of a run after ``step`` optimiser steps; see the module docstring for the fields."""
    options: dict
    epoch: int
    batch: int
    step: int
    data_order: torch.Tensor | None
    rng: dict
    models: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    scalers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        return bool(self.extra.get(STOPPED_EARLY))

    def completes(self, epochs: int) -> bool:
        """Whether a run of ``epochs`` epochs in all has nothing left to do after this record."""
        return self.batch == 0 and (self.epoch >= epochs or self.stopped_early)

    def as_dict(self) -> dict:
        return {'format': FORMAT, 'version': VERSION, 'options': self.options, 'epoch': self.epoch,
                'batch': self.batch, 'step': self.step, 'data_order': self.data_order, 'rng': self.rng,
                'models': self.models, 'optimizers': self.optimizers, 'scalers': self.scalers, 'extra': self.extra}


def save_resume_record(path: str | Path, record: ResumeRecord) -> None:
    """Atomic: a crash leaves the previous record or this one, never a mixture."""
    atomic.torch_save(path, record.as_dict())


def load_resume_record(path: str | Path) -> ResumeRecord:
    """The record at ``path`` (``weights_only=True``); a file that is no record of this format is one line."""
    path = Path(path)
    obj = read_checkpoint(path, 'resume record of a training run')
    if obj.get('format') != FORMAT:
        raise PipelineError(f'{path} is not a resume record of this project (no format marker {FORMAT!r})')
    if obj.get('version') != VERSION:
        raise PipelineError(f'{path} is a resume record of version {obj.get("version")!r}; this code reads '
                            f'version {VERSION}')
    try:
        record = ResumeRecord(options=dict(obj['options']), epoch=int(obj['epoch']), batch=int(obj['batch']),
                              step=int(obj['step']), data_order=obj['data_order'], rng=dict(obj['rng']),
                              models=dict(obj['models']), optimizers=dict(obj['optimizers']),
                              scalers=dict(obj['scalers']), extra=dict(obj['extra']))
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f'{path} is an incomplete resume record ({type(exc).__name__}: {exc})') from None
    if record.batch and not isinstance(record.data_order, torch.Tensor):
        raise PipelineError(f'{path} is a resume record inside an epoch without its data order')
    return record


def option_differences(recorded: dict, current: dict, changeable=RESUMABLE_OPTIONS) -> list[str]:
    """``'name: recorded -> current'`` for every option other than ``changeable`` that differs (nested dicts
    are compared key by key, so the line names the innermost key)."""
    before, after = flatten_settings(recorded), flatten_settings(current)
    missing = object()
    lines = []
    for key in list(before) + [k for k in after if k not in before]:
        if key.split('.')[0] in changeable:
            continue
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            shown_old = 'unset' if old is missing else repr(old)
            shown_new = 'unset' if new is missing else repr(new)
            lines.append(f'{key}: {shown_old} -> {shown_new}')
    return lines


def check_resume_options(recorded: dict, current: dict, where: str | Path, changeable=RESUMABLE_OPTIONS,
                         option_names: dict[str, str] | None = None) -> None:
    """One-line refusal naming the first differences between a run's recorded options and this call's.

    ``option_names`` spells an option whose command-line name is not ``--`` + its key (e.g. ``{'epochs':
    '--max-epochs'}``)."""
    differences = option_differences(recorded, current, changeable)
    if differences:
        names = {**OPTION_NAMES, **(option_names or {})}
        shown = '; '.join(differences[:3]) + (f'; ... ({len(differences)} in all)' if len(differences) > 3 else '')
        raise PipelineError(f'{where} was started with other options ({shown}); only '
                            f'{", ".join(names.get(o, "--" + o.replace("_", "-")) for o in changeable)} may '
                            'change on resume')
