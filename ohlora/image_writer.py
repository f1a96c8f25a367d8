"""Writing a run's images in worker threads while the caller renders the next batch (stages 1 and 6).

OpenCV's encoders release the GIL, so the encoding and atomic writes of batch k run in threads while the caller
renders batch k + 1; when batch k + 1 is handed over, batch k's files are waited for, before batch k + 2 is
rendered. So at most two batches of images are held, and a failed write (one line, from :mod:`ohlora.atomic`)
stops the run one batch later at the latest. Leaving the ``with`` block waits for the rest, after Ctrl-C (or
another stop signal) too: those images are rendered already, at most two batches, and keeping them is work a
resume need not redo (and which images exist does not depend on thread timing). After an error the writes already
running finish (each is atomic) and the queued ones are dropped.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ohlora import atomic


class BatchImageWriter:
    """``with BatchImageWriter(on_written=bar.update) as writer: writer.submit([(path, bgr), ...])`` per batch."""

    def __init__(self, workers: int = 4, on_written: Callable[[int], object] | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._in_flight: deque[list[Future]] = deque()
        self._on_written = on_written

    def submit(self, images: Iterable[tuple[Path, np.ndarray]]) -> None:
        """Queue one batch of (path, uint8 BGR image); returns once the batch before it is written."""
        self._in_flight.append([self._pool.submit(atomic.write_image, path, bgr) for path, bgr in images])
        while len(self._in_flight) > 1:
            self._finish(self._in_flight.popleft())

    def _finish(self, futures: list[Future]) -> None:
        for future in futures:
            future.result()  # re-raises a failed write here, in the caller's thread
        if self._on_written is not None:
            self._on_written(len(futures))

    def __enter__(self) -> 'BatchImageWriter':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                while self._in_flight:
                    self._finish(self._in_flight.popleft())
        finally:
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None and not interrupted)
