"""Stage-5 training on several processes (``torchrun``): what the v1, v2 and v3 trainers share.

Without torchrun (one process) every helper here is a pass-through, so a single-process run is the run it always
was, bit for bit. Under ``torchrun --nproc_per_node N`` (and ``--nnodes M``) each process (rank) has one device
(:func:`ohlora.distributed.context`: ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo) and:

* **data**: ``--batch-size`` is the batch of one step over all processes (the effective batch); every rank cuts
  the same seeded epoch order into the same batches and trains on its strided share of each
  (:func:`stylegan_modified.datasets.rank_share`): disjoint images whose union is the batch one process trains on;
* **gradients**: :func:`wrap` puts a module into ``DistributedDataParallel`` after its ``requires_grad`` flags are
  set, so DDP syncs exactly the trainable parameters; a step calls the wrapper only where those parameters get
  gradients and the bare module elsewhere (v1's frozen half of a G/D step), so no ``find_unused_parameters`` is
  needed. DDP averages the ranks' gradients of equal shares: the gradient of the mean loss over the whole batch;
* **buffers**: not re-broadcast from rank 0 at each forward. The one buffer training changes, the generator's
  ``w_avg``, moving-averages the mean of w over the whole batch (:func:`batch_w_mean`, GenForce's all-gather),
  so every rank keeps the same value. D's minibatch-stddev groups stay within a rank's share;
* **decisions** that must agree (v1's G/D alternation, early stopping, NaN stops) use the losses averaged over
  the ranks (:func:`mean_over_ranks`), and a stop signal that reached any rank stops all of them after the same
  step (:func:`agree_stop`);
* **writing**: rank 0 alone logs, writes snapshots, checkpoints, records and the train logs; the resume record
  holds every rank's RNG streams (:func:`ohlora.resume.capture_rank_rng_states`), each rank seeded differently
  (:func:`start_rngs`).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from ohlora.distributed import DistContext, context
from ohlora.resume import (ResumeRecord, rank_seed, recorded_world_size, restore_rank_rng_state, seed_everything)
from stylegan_modified.datasets import rank_share
from stylegan_modified.training_control import GracefulStop

logger = logging.getLogger(__name__)


def training_context(device: torch.device) -> DistContext:
    """This process's :class:`~ohlora.distributed.DistContext` (torchrun's environment, if any). Ranks other than 0
    log errors only, so the console shows rank 0's notes and warnings once."""
    if os.environ.get('RANK', '0') != '0':
        logging.getLogger().setLevel(logging.ERROR)
    return context(device)


def describe(ctx: DistContext, what: str, batch_size: int, unit: str = 'images') -> None:
    """The log line (rank 0) naming the world size and the effective batch."""
    if not ctx.is_main:
        return
    if ctx.distributed:
        logger.info('%s: world size %d (%s, %s on rank 0), batch %d %s per step = %d per process', what,
                    ctx.world_size, 'NCCL' if ctx.device.type == 'cuda' else 'gloo', ctx.device, batch_size, unit,
                    batch_size // ctx.world_size)
    else:
        logger.info('%s: world size 1 (%s), batch %d %s per step', what, ctx.device, batch_size, unit)


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``module`` in DDP (several processes; its trainable parameters must be set) or ``module`` itself."""
    if not ctx.distributed:
        return module
    device_ids = [ctx.device] if ctx.device.type == 'cuda' else None
    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)


def share(batch: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's images of a step's batch (the whole batch in one process)."""
    return rank_share(batch, ctx.rank, ctx.world_size) if ctx.distributed else list(batch)


def rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of a step's batch tensor (strided, as :func:`share`)."""
    return tensor[ctx.rank::ctx.world_size] if ctx.distributed else tensor


def mean_over_ranks(ctx: DistContext, *values: torch.Tensor | float) -> list[float]:
    """The values (losses, scores) averaged over the ranks: what a decision all ranks must agree on uses. The
    ranks' shares are equal, so the mean of their batch means is the mean over the whole batch."""
    if not ctx.distributed:
        return [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values]
    local = torch.tensor([float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in values],
                         dtype=torch.float64, device=ctx.device)
    return ctx.all_reduce_mean(local).tolist()


def gather(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (CPU, concatenated in rank order along dim 0)."""
    tensor = tensor.detach().cpu()
    return torch.cat(ctx.all_gather_objects(tensor)) if ctx.distributed else tensor


def agree_stop(ctx: DistContext, stop: GracefulStop) -> str | None:
    """The stop signal's name if it reached any rank (then set on every rank's ``stop``), else None."""
    if ctx.distributed:
        flag = torch.tensor([0.0 if stop.requested is None else 1.0], device=ctx.device)
        if float(ctx.all_reduce_mean(flag)) > 0:
            stop.requested = next(name for name in ctx.all_gather_objects(stop.requested) if name)
    return stop.requested


def batch_w_mean(ctx: DistContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator's ``batch_w_mean`` over every rank's share (all-reduced; float32 for the collective)."""
    def mean(w: torch.Tensor) -> torch.Tensor:
        return ctx.all_reduce_mean(w.mean(dim=0).float())
    return mean


def distribute_generator(generator: torch.nn.Module, ctx: DistContext) -> None:
    """Let a train-mode generator average the whole batch into ``w_avg`` (one process: unchanged)."""
    if ctx.distributed:
        generator.batch_w_mean = batch_w_mean(ctx)


def main_first(ctx: DistContext, function: Callable[[], object]):
    """``function()`` on rank 0, then on the other ranks once rank 0 is done (a download they then find)."""
    if ctx.is_main:
        result = function()
        ctx.barrier()
        return result
    ctx.barrier()
    return function()


def start_rngs(ctx: DistContext, seed: int, record: ResumeRecord | None) -> None:
    """Seed a fresh run's global streams (rank 0 from ``seed``, the others from seeds drawn from it), or restore
    each rank's own from the resume record. A record of another number of processes continues, not exactly."""
    if record is None:
        seed_everything(rank_seed(seed, ctx.rank))
        return
    restore_rank_rng_state(record.rng, ctx, seed, record.step)
    recorded = record.options.get('world_size', recorded_world_size(record.rng))
    if recorded != ctx.world_size and ctx.is_main:
        logger.warning('resuming a run of %s process(es) with %d: it continues from its checkpoint, but not '
                       'bit-exactly as it would have with %s (other shares of each batch, other random streams)',
                       recorded, ctx.world_size, recorded)
