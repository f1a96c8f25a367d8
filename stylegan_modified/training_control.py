"""What every training loop needs around its steps: stopping cleanly on Ctrl-C/SIGTERM, refusing non-finite
losses, opt-in mixed precision, and the speed/memory figures of the log. Shared by the stage-5 trainers.

* :class:`GracefulStop`: the first SIGINT/SIGTERM only sets a flag; the loop finishes its step, writes a
  complete checkpoint and returns. A second signal interrupts at once (KeyboardInterrupt); the last
  checkpoint on disk is complete either way, because every file is written atomically.
* DataLoader workers (:func:`ignore_stop_signals_in_worker`) ignore both signals: Ctrl-C, Slurm, ``timeout`` and
  ``kill -- -PGID`` signal the whole process group, and a worker killed by it would crash the main process (PyTorch
  raises "DataLoader worker ... is killed by signal" at any point of the step). Workers exit through PyTorch's
  watchdog once the main process is gone. A worker that dies anyway after a stop was requested (the signal came
  while it was starting, before it could ignore it) is the stop, not a failure: :meth:`GracefulStop.batches`
  raises :class:`WorkersStopped` and the trainer writes the checkpoint of the steps done.
* :func:`check_finite`: a NaN/inf loss stops the run with one line (:class:`NonFiniteLoss`) *before* the
  optimiser step, so the last checkpoint written is the last good state.
* :class:`MixedPrecision`: ``--amp`` = autocast (float16 on CUDA, bfloat16 on CPU) and one GradScaler per
  optimiser; without it every call is a pass-through, so the fp32 path is unchanged. Exact resume is
  promised only without it.
* :class:`Throughput`: images/s of each step and the peak GPU memory.
* :func:`epoch_loader` (an epoch's batches through workers that ignore the stop signals) and :func:`worker_error`
  (a PipelineError from a worker, back to its one line).
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ohlora.errors import PipelineError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkersStopped(Exception):
    """A DataLoader worker died after a stop was requested (the stop signal reached it too): the stop itself.
    Raised by :meth:`GracefulStop.batches` between two batches, so no step is half done."""


def is_worker_death(exc: BaseException) -> bool:
    """PyTorch's error for a DataLoader worker that died ("DataLoader worker (pid ...) is killed by signal ..." or
    "... exited unexpectedly")."""
    return isinstance(exc, RuntimeError) and 'DataLoader worker' in str(exc)


class GracefulStop:
    """Context manager: turns the first SIGINT/SIGTERM into ``requested`` (the signal's name).

    Once a stop is requested, a DataLoader worker that dies no longer raises in the middle of the step that is
    finishing (PyTorch's SIGCHLD handler would); iterate loaders through :meth:`batches`, which turns such a death
    into :class:`WorkersStopped` at the next batch."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        self._fetching = False  # in batches(), waiting for the next batch

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt  # a second signal: stop now, the last checkpoint is complete
        self.requested = signal.Signals(signum).name
        self._tolerate_worker_deaths()

    def _tolerate_worker_deaths(self) -> None:
        """Wrap the SIGCHLD handler (PyTorch's, which raises when a worker died) so that a worker death after the
        stop does not interrupt the step, the epoch test or the checkpoint under way. Signal handlers run in the
        main thread, where this is called."""
        if signal.SIGCHLD in self._previous:
            return
        previous = signal.getsignal(signal.SIGCHLD)
        self._previous[signal.SIGCHLD] = previous

        def handler(signum, frame):
            if callable(previous):
                try:
                    previous(signum, frame)
                except RuntimeError as exc:
                    if not is_worker_death(exc):
                        raise
                    if self._fetching:  # waiting in batches() for a batch that may never come: stop now
                        raise WorkersStopped(self.requested) from None

        signal.signal(signal.SIGCHLD, handler)

    def batches(self, loader: Iterable) -> Iterator:
        """The items of ``loader``; a worker death after a stop was requested ends them with
        :class:`WorkersStopped` (while waiting for a batch, so the steps done are whole); other errors pass."""
        iterator = iter(loader)
        while True:
            self._fetching = True
            try:
                items = next(iterator)
            except StopIteration:
                return
            except RuntimeError as exc:
                if self.requested is not None and is_worker_death(exc):
                    raise WorkersStopped(self.requested) from None
                raise
            finally:
                self._fetching = False
            yield items

    def __enter__(self) -> 'GracefulStop':
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and a SIGTERM to the process group (Slurm, ``timeout``,
    ``kill -- -PGID``) reach the workers too; only the main process handles them. A worker exits when the main
    process shuts the loader down, or through PyTorch's watchdog when the main process is gone."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def epoch_loader(dataset: Dataset, batches: list[list[int]], workers: int, device: torch.device) -> DataLoader:
    """A loader of ``batches`` (dataset indices: this process's shares of the batches still to do)."""
    # Its own torch.Generator: creating the iterator must not draw from the global RNG (exact resume).
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == 'cuda',
                      generator=torch.Generator(), worker_init_fn=ignore_stop_signals_in_worker)


def worker_error(exc: PipelineError) -> PipelineError:
    """A PipelineError raised in a DataLoader worker (e.g. an image that vanished or broke after the check) arrives
    wrapped in several lines ("Caught PipelineError in DataLoader worker ... Traceback ..."); keep its message."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1:
        return PipelineError(lines[-1].split('PipelineError: ', 1)[-1])
    return exc


def workers_stopped_error(stop: GracefulStop, last_checkpoint: str) -> PipelineError:
    """With several processes a stop found by one rank's loader cannot be agreed on (the others are in a
    collective), so the rank ends with one line; torchrun then ends the others and ``--resume`` continues."""
    return PipelineError(f'a DataLoader worker was killed by the {stop.requested} that stopped the run; '
                         f'{last_checkpoint}')


class NonFiniteLoss(PipelineError):
    """A loss became NaN or infinite; the run stopped before the optimiser step."""


def check_finite(where: str, last_checkpoint: str, **losses: torch.Tensor | float) -> None:
    """One-line stop if any loss is NaN/inf; ``where`` and ``last_checkpoint`` say what is kept."""
    for name, value in losses.items():
        number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(number):
            raise NonFiniteLoss(f'{name} became {number} at {where}; stopped before the optimiser step, '
                                f'{last_checkpoint}')


class MixedPrecision:
    """``autocast()`` and ``step(name, loss, optimizer)``; one GradScaler per optimiser name."""

    def __init__(self, enabled: bool, device: torch.device, names: Sequence[str]):
        self.enabled = bool(enabled)
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        # bfloat16 has float32's range, so only float16 needs loss scaling.
        scale = self.enabled and self.dtype == torch.float16
        self.scalers = {name: torch.amp.GradScaler(self.device.type, enabled=scale) for name in names}

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, name: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward (scaled), step (skipped by the scaler on inf gradients), update."""
        scaler = self.scalers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict:
        return {name: scaler.state_dict() for name, scaler in self.scalers.items()}

    def load_state_dict(self, states: dict) -> None:
        for name, state in states.items():
            if name in self.scalers and state:
                self.scalers[name].load_state_dict(state)


class Throughput:
    """Images per second of each step (wall time between calls of :meth:`tick`) and peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.last = time.perf_counter()
        self.smoothed: float | None = None
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)

    def _sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def restart(self) -> None:
        """Start timing afresh (after a pause such as a checkpoint or a snapshot)."""
        self._sync()
        self.last = time.perf_counter()

    def tick(self, images: int) -> float:
        self._sync()
        now = time.perf_counter()
        rate = images / max(now - self.last, 1e-9)
        self.last = now
        self.smoothed = rate if self.smoothed is None else 0.9 * self.smoothed + 0.1 * rate
        return rate

    def peak_memory_mb(self) -> float | None:
        if self.device.type != 'cuda':
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
