"""What every benchmark shares: a parser with --device and --threads, the device set-up, GPU-aware timing.

The benchmarks run as scripts (``python bench/bench_x.py``), so this module is imported by its plain name.
"""
from __future__ import annotations

import argparse

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
