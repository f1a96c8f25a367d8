"""Benchmark: v1 fine-tuning steps on one process against two DDP processes (gloo, this CPU), same batch.

The step is the v1 trainer's (a D step with R1, then --g-steps G steps) on conditional G and D at 256x256 with
small widths (--fmaps-max, default 64), a batch of --batch-size images per step over all processes. Measured in
turns, best pass kept: one process with one thread, one process with two threads, and two processes of one
thread each (started here with torch.multiprocessing, as torchrun would start them: RANK, WORLD_SIZE, ...;
each trains on half of every batch and DDP all-reduces the gradients). The ratios are two processes against
one process with the same number of threads in all, and against one thread. On GPUs the same comparison is
``torchrun --standalone --nproc_per_node N`` of the real script against one process.

    python bench/bench_ddp.py                         # about a minute on 2 CPU cores
    python bench/bench_ddp.py --batch-size 16 --fmaps-max 128 --steps 3
"""
from __future__ import annotations

import os
import socket
import time

import torch
import torch.multiprocessing as mp

from ohlora.cli import positive_int
from ohlora.distributed import DistContext, close, context
from stylegan_modified.fine_tuning import FineTuningSettings, Hyperparameters, V1Trainer
from stylegan_modified.stylegan_discriminator import StyleGANDiscriminator
from stylegan_modified.stylegan_generator import StyleGANGenerator
from bench_common import bench_parser


def trainer(args, ctx: DistContext) -> V1Trainer:
    torch.manual_seed(0)
    widths = dict(fmaps_base=args.fmaps_max * 64, fmaps_max=args.fmaps_max)
    generator = StyleGANGenerator(resolution=256, z_space_dim=args.fmaps_max, w_space_dim=args.fmaps_max,
                                  mapping_fmaps=args.fmaps_max, **widths)
    discriminator = StyleGANDiscriminator(resolution=256, **widths)
    hyper = Hyperparameters(max_g_steps=args.g_steps, g_loss_ratio=0.0)  # exactly --g-steps G steps
    settings = FineTuningSettings(epochs=1, batch_size=args.batch_size, hyper=hyper)
    return V1Trainer(generator, discriminator, settings, ctx.device, ctx)


def timed(args, ctx: DistContext) -> float:
    """Best time of --repeat passes of --steps steps on this rank's share of the batch."""
    step_trainer = trainer(args, ctx)
    share = args.batch_size // ctx.world_size
    reals = torch.rand(share, 3, 256, 256, generator=torch.Generator().manual_seed(ctx.rank)) * 2 - 1
    labels = torch.randn(share, 7, generator=torch.Generator().manual_seed(100 + ctx.rank))
    step_trainer.step(reals, labels)  # warm-up: allocator, optimiser state, DDP buckets
    best = float('inf')
    for _ in range(args.repeat):
        ctx.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step_trainer.step(reals, labels)
        ctx.barrier()
        best = min(best, time.perf_counter() - start)
    return best


def _rank(rank: int, args, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        seconds = timed(args, context(torch.device('cpu')))
        if rank == 0:
            results.put(seconds)
    finally:
        close()


def two_processes(args) -> float:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    results = mp.get_context('spawn').SimpleQueue()
    mp.start_processes(_rank, args=(args, port, results), nprocs=2, join=True, start_method='spawn')
    return results.get()


def main() -> None:
    parser = bench_parser(__doc__, device_default='cpu')
    parser.add_argument('--batch-size', type=positive_int, default=8,
                        help='images per step, all processes (default: 8)')
    parser.add_argument('--fmaps-max', type=positive_int, default=64, help='widest layer of G and D (default: 64)')
    parser.add_argument('--steps', type=positive_int, default=4, help='timed steps per pass (default: 4)')
    parser.add_argument('--repeat', type=positive_int, default=2, help='passes, best kept (default: 2)')
    parser.add_argument('--g-steps', type=positive_int, default=1, help='G steps per D step (default: 1)')
    args = parser.parse_args()
    if args.batch_size % 2:
        parser.error('--batch-size must split evenly over the two processes')
    print(f'v1 step (D step + {args.g_steps} G step), G and D at 256x256 with widths up to {args.fmaps_max}, batch '
          f'{args.batch_size} per step over all processes, {args.steps} steps per pass, best of {args.repeat}')
    seconds = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        seconds[f'1 process, {threads} thread(s)'] = timed(args, DistContext())
    seconds['2 processes (gloo), 1 thread each'] = two_processes(args)
    for name, value in seconds.items():
        steps_s = args.steps / value
        print(f'{name:36s}: {steps_s:6.3f} steps/s, {steps_s * args.batch_size:7.2f} img/s')
    two, one = seconds['2 processes (gloo), 1 thread each'], seconds['1 process, 2 thread(s)']
    print(f'2 processes / 1 process of 2 threads: x{one / two:.2f}; '
          f'/ 1 process of 1 thread: x{seconds["1 process, 1 thread(s)"] / two:.2f}')


if __name__ == '__main__':
    main()
