"""Running on several processes: torchrun's environment, one device per rank, and how work is split.

Two ways to spread work, one API:

* **torchrun** (``torchrun --standalone --nproc_per_node N script.py …``, or multi-node with ``--nnodes`` and a
  rendezvous endpoint): :func:`context` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, starts the process
  group (NCCL on CUDA, gloo on the CPU) and gives each rank its own device (``cuda:LOCAL_RANK``). Trainers wrap
  their models in DDP; inference stages take the rank's share of the items.
* **independent jobs** (a cluster scheduler, no process group): ``--shard i/n`` gives job *i* of *n* its share;
  a documented merge step then turns the per-shard records into exactly the files one process writes.

Shares are strided (item k goes to shard k mod n), so every shard gets the same number of items within one and
an item's shard never depends on how many items there are.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ohlora.errors import PipelineError

logger = logging.getLogger(__name__)

__all__ = ['DistContext', 'Shard', 'context', 'parse_shard', 'shard_of', 'close']


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0-based): the items k with k % count == index."""
    index: int = 0
    count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    def take(self, items):
        """This shard's items, in their order."""
        return list(items)[self.index::self.count]

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def __str__(self) -> str:
        return f'{self.index}/{self.count}'


def parse_shard(text: str | None) -> Shard:
    """``'i/n'`` (0 <= i < n) -> Shard; None -> the whole job. One-line error for anything else."""
    if text is None:
        return Shard()
    try:
        index, count = (int(part) for part in str(text).split('/'))
    except ValueError:
        raise PipelineError(f'--shard {text!r}: expected i/n, e.g. 0/4 for the first of four jobs') from None
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f'--shard {text}: i must be in 0..n-1 and n at least 1')
    return Shard(index, count)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, snapshots, checkpoints and records."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over all ranks (a copy; the input is unchanged)."""
        if not self.distributed:
            return tensor.clone()
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced / self.world_size

    def all_gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (small picklable objects: RNG states, counts)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f'environment variable {name}={value!r} is not a whole number (set by torchrun?)') from None


def context(device: torch.device, timeout: timedelta | None = None) -> DistContext:
    """This process's :class:`DistContext`. Under torchrun (``WORLD_SIZE`` > 1) it starts the process group once:
    NCCL with one GPU per rank when ``device`` is CUDA, gloo on the CPU. ``device`` is the resolved ``--device``;
    under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``. ``timeout``: how long a collective may wait for the
    other ranks before the job is aborted (None: PyTorch's default, 10 minutes for NCCL)."""
    world_size = _env_int('WORLD_SIZE', 1)
    if world_size <= 1:
        return DistContext(device=device)
    rank, local_rank = _env_int('RANK', 0), _env_int('LOCAL_RANK', 0)
    if device.type == 'cuda':
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(f'LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; '
                                'start at most that many processes per node (--nproc_per_node)')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, **({} if timeout is None else {'timeout': timeout}))
        logger.info('distributed: rank %d of world size %d (local rank %d, %s, backend %s)', rank, world_size,
                    local_rank, device, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shard_of(ctx: DistContext, shard: Shard) -> Shard:
    """The share of this process: torchrun's rank (``--shard`` must then be absent) or ``--shard``."""
    if ctx.distributed and not shard.whole:
        raise PipelineError('--shard splits independent jobs; under torchrun the ranks already split the work, '
                            'so drop --shard (or run the jobs without torchrun)')
    return ctx.shard if ctx.distributed else shard


def close() -> None:
    """End the process group (scripts call it once at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
