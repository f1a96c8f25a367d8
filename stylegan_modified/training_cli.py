"""The command line the three stage-5 training scripts share (``run_stylegan_fine_tuning.py``, ``_v2.py``, ``_v3.py``).

* the options every trainer has (:func:`add_workers_option`, :func:`add_trainer_options`: ``--workers``,
  ``--checkpoint-every``, ``--amp``, ``--tf32``, ``--resume``; each script adds its own ``--overwrite`` after them,
  whose help names its own files), with each script's own help where its behaviour differs;
* the checks of option values a trainer's settings make (:func:`check_at_least`) and what ``--compat upstream``
  means to them (:class:`CompatSettings`);
* the start of a run (:func:`start`: layout, device, TF32 off, torchrun's context) and its end on the terminal
  (:func:`second_signal_exits`, :func:`report`): like :func:`ohlora.cli.run`, script plumbing that writes to the
  terminal itself.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, Sequence

import torch

from ohlora.cli import positive_int
from ohlora.devices import disable_tf32, resolve_device
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.schedules import DEFAULT_SCHEDULE
from stylegan_modified.ddp import training_context

TF32_HELP = ('TF32 matmuls and convolutions on CUDA GPUs of the Ampere generation and newer: about twice as fast '
             'float32 training (a v1 step 5.5 s -> 2.5 s on an H200) at ~1e-3 precision; off by default so that runs '
             'compare exactly; may change on --resume; no effect on CPU')
CHECKPOINT_EVERY_HELP = ('checkpoint also every N steps (default: 0, at the end of each epoch only; Ctrl-C and SIGTERM '
                         'always write one)')
RESUME_HELP = 'continue (or extend) the run in the run folder'
SECOND_SIGNAL = 'interrupted; the last checkpoint on disk is complete: continue with --resume'
STOPPED_STATUS = 130  # as a shell reports a command ended by Ctrl-C


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == '0' else positive_int(text)


def check_at_least(*checks: tuple[str, int, int]) -> None:
    """One line for the first ``(option, value, low)`` whose value is below ``low``."""
    for option, value, low in checks:
        if value < low:
            raise PipelineError(f'{option} must be at least {low}, got {value}')


class CompatSettings:
    """Base of a trainer's settings dataclass with a ``compat`` field (not a dataclass itself: the fields, in the
    order training_options.json shows them, stay with each trainer)."""

    @property
    def upstream(self) -> bool:
        return self.compat == 'upstream'

    @property
    def schedule(self) -> str:
        """The LR curve of :mod:`ohlora.schedules`: upstream's with ``--compat upstream``, else the default."""
        return 'upstream' if self.upstream else DEFAULT_SCHEDULE


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workers', type=non_negative_int, default=2, help='image-decoding processes (default: 2)')


def add_trainer_options(parser: argparse.ArgumentParser, *, amp_detail: str,
                        checkpoint_every_help: str = CHECKPOINT_EVERY_HELP, resume_help: str = RESUME_HELP,
                        workers: bool = True) -> None:
    """``--workers`` (unless ``workers`` is False: a script that lists it earlier), ``--checkpoint-every``, ``--amp``
    (``amp_detail``: what it does in this trainer), ``--tf32``, ``--resume``, in this order."""
    if workers:
        add_workers_option(parser)
    parser.add_argument('--checkpoint-every', type=non_negative_int, default=0, help=checkpoint_every_help)
    parser.add_argument('--amp', action='store_true',
                        help=f'mixed precision ({amp_detail}); exact resume only without it')
    parser.add_argument('--tf32', action='store_true', help=TF32_HELP)
    parser.add_argument('--resume', action='store_true', help=resume_help)


def start(args: argparse.Namespace) -> tuple[Layout, torch.device, DistContext]:
    """The layout of ``--root``, the resolved ``--device`` (TF32 off: ``--tf32`` switches it on around the training
    steps only) and this process's torchrun context (rank and device; one process without torchrun)."""
    layout = Layout(args.root)
    device = resolve_device(args.device)
    disable_tf32()
    return layout, device, training_context(device)


@contextlib.contextmanager
def second_signal_exits() -> Iterator[None]:
    """Around the training call: a second Ctrl-C/SIGTERM (the first stops after a complete checkpoint) interrupts
    at once; every file is written atomically, so the last checkpoint on disk is whole."""
    try:
        yield
    except KeyboardInterrupt:
        print(SECOND_SIGNAL, file=sys.stderr)
        sys.exit(STOPPED_STATUS)


def report(ctx: DistContext, lines: Sequence[str] = (), stopped: Sequence[str] = ()) -> None:
    """The end of a training script: rank 0 prints ``lines`` on stdout, then ``stopped`` (what a run that a stop
    signal ended says) on stderr; such a run exits with status 130 on every rank."""
    if ctx.is_main:
        for line in lines:
            print(line)
        for line in stopped:
            print(line, file=sys.stderr)
    if stopped:
        sys.exit(STOPPED_STATUS)
