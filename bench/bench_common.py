"""What every benchmark shares: a parser with --device and --threads, the device set-up, GPU-aware timing, and the
float32-against-``--amp`` comparison of the trainer benchmarks.

The benchmarks run as scripts (``python bench/bench_x.py``), so this module is imported by its plain name.
"""
from __future__ import annotations

import argparse
import resource
import time
from typing import Callable

import torch

from ohlora.cli import positive_int
from ohlora.devices import disable_tf32, resolve_device


def bench_parser(doc: str, device_default: str | None = None, threads_default: int | None = None):
    """The module docstring's first paragraph is the description, the rest (examples) the epilog."""
    parser = argparse.ArgumentParser(description=doc.split('\n\n')[0], epilog=doc.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default=device_default,
                        help=f'torch device (default: {device_default or "cuda if available, else cpu"})')
    parser.add_argument('--threads', type=positive_int, default=threads_default,
                        help=f'torch CPU threads (default: {threads_default or "torch default"})')
    return parser


def prepare_device(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    disable_tf32()
    return resolve_device(args.device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], object], steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` calls of ``step``, the queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def compare_precisions(trainers: dict, step: Callable[[object], object], steps: int, repeat: int, batch_size: int,
                       device: torch.device) -> dict[bool, float]:
    """``trainers`` {amp: trainer} (False: float32, True: ``--amp``; each has ``amp.dtype``): one warm-up step each
    (kernels, allocator, optimiser state), then ``repeat`` passes of ``steps`` calls of ``step(trainer)`` per
    precision, in turns; prints each precision's best pass (steps/s, img/s, peak GPU memory), the ratio amp /
    float32 and, on CPU, the process's peak resident memory. Returns the best pass's seconds per precision."""
    best, peak = {}, {}
    for trainer in trainers.values():
        step(trainer)
    for _ in range(repeat):
        for amp, trainer in trainers.items():
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            best[amp] = min(best.get(amp, float('inf')), timed_steps(lambda: step(trainer), steps, device))
            if device.type == 'cuda':
                peak[amp] = max(peak.get(amp, 0), torch.cuda.max_memory_allocated(device) / 2**30)

    for amp, name in ((False, 'float32'), (True, f'amp ({trainers[True].amp.dtype})'.replace('torch.', ''))):
        steps_s = steps / best[amp]
        memory = f', peak GPU memory {peak[amp]:.2f} GiB' if amp in peak else ''
        print(f'{name:18s}: {steps_s:7.3f} steps/s, {steps_s * batch_size:7.2f} img/s{memory}')
    print(f'amp / float32: x{best[False] / best[True]:.2f}')
    if device.type == 'cpu':
        print(f'peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} '
              'GiB')
    return best
