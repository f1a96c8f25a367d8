"""Run a function in N gloo processes on this CPU, as torchrun would start them (RANK, WORLD_SIZE, ...)."""
import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, function, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    try:
        function(rank, *args)
    finally:
        from ohlora.distributed import close
        close()


def run_ranks(function, *args, world_size: int = 2) -> None:
    """``function(rank, *args)`` in ``world_size`` processes (spawned: picklable, module-level functions only)."""
    mp.start_processes(_entry, args=(world_size, free_port(), function, args), nprocs=world_size, join=True,
                       start_method='spawn')
