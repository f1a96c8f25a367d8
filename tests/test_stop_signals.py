"""Stop signals and DataLoader workers (the stage-5 trainers' loaders, the v2 scoring pass, dataset verify()).

Ctrl-C, Slurm, ``timeout`` and ``kill -- -PGID`` signal the whole process group: the workers must ignore SIGINT and
SIGTERM (only the main process stops, after a complete checkpoint), and a worker that dies anyway after the stop
was requested (the signal came while it was starting) is the stop, not a crash: neither in the middle of the step
under way nor while the main process waits for the next batch.
"""
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ohlora import atomic
from ohlora.constants import SCORE_COLUMNS
from ohlora.layout import Layout
from stylegan_modified.datasets import ScoredImageDataset
from stylegan_modified.property_cnn_scoring import score_dataset
from stylegan_modified.training_control import GracefulStop, WorkersStopped, ignore_stop_signals_in_worker
from test_training_toolkit import write_images

MAIN = os.getpid()


def in_worker() -> bool:
    return os.getpid() != MAIN


class SignalsItself(Dataset):
    """Every item sends SIGTERM and SIGINT to the worker that reads it (a signal to the process group)."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        if in_worker():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return index


class DiesOnItem(Dataset):
    """Item ``fatal`` (after ``delay`` s): SIGTERM to the main process, then the worker dies (SIGKILL), as a worker
    that the group's SIGTERM reached before it could ignore it."""

    def __init__(self, fatal, delay):
        self.fatal, self.delay = fatal, delay

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == self.fatal and in_worker():
            time.sleep(self.delay)
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGKILL)
        return index


def test_dataloader_workers_ignore_ctrl_c_and_sigterm():
    loader = DataLoader(SignalsItself(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals_in_worker)
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5]]


def test_a_worker_dying_after_the_stop_does_not_break_the_step_under_way():
    """Item 1's worker dies while the main process is in the "step" of item 0: before the fix PyTorch's SIGCHLD
    handler raised "DataLoader worker ... is killed by signal" right there. The step ends and the loop stops."""
    loader = DataLoader(DiesOnItem(fatal=1, delay=0.5), batch_size=1, num_workers=2,
                        worker_init_fn=ignore_stop_signals_in_worker)
    seen = []
    with GracefulStop() as stop:
        for item in stop.batches(loader):
            seen.append(int(item))
            deadline = time.monotonic() + 20
            while stop.requested is None and time.monotonic() < deadline:  # the step, during which the worker dies
                time.sleep(0.01)
            time.sleep(0.5)  # the worker's death (SIGCHLD) arrives while the step goes on
            if stop.requested:
                break
        assert stop.requested == 'SIGTERM'
    assert seen == [0]


def test_a_worker_dying_after_the_stop_while_a_batch_is_awaited_is_the_stop():
    """The main process waits for item 3, whose worker dies after the stop: WorkersStopped at once (no wait for
    PyTorch's 5-second worker check), the items before it were all delivered."""
    loader = DataLoader(DiesOnItem(fatal=3, delay=1.0), batch_size=1, num_workers=2,
                        worker_init_fn=ignore_stop_signals_in_worker)
    seen = []
    started = time.monotonic()
    with GracefulStop() as stop:
        with pytest.raises(WorkersStopped):
            for item in stop.batches(loader):
                seen.append(int(item))
        assert stop.requested == 'SIGTERM'
    assert seen == [0, 1, 2]
    assert time.monotonic() - started < 4.5


def test_a_worker_death_without_a_stop_is_still_an_error():
    class Dies(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index == 1 and in_worker():
                os.kill(os.getpid(), signal.SIGKILL)
            return index

    with GracefulStop() as stop:
        with pytest.raises(RuntimeError, match='DataLoader worker'):
            for _ in stop.batches(DataLoader(Dies(), batch_size=1, num_workers=1)):
                time.sleep(0.2)
        assert stop.requested is None


@pytest.fixture
def scored(tmp_path):
    layout = Layout(tmp_path)
    write_images(layout, [1, 2, 3, 4])
    frame = pd.DataFrame(np.zeros((4, 7)), columns=SCORE_COLUMNS)
    frame.insert(0, 'img_no', [1, 2, 3, 4])
    atomic.write_csv(tmp_path / 's.csv', frame)
    return ScoredImageDataset.filtered(layout, tmp_path / 's.csv')


def signal_the_worker(monkeypatch):
    """Every image read in a worker first sends that worker SIGTERM and SIGINT."""
    read = ScoredImageDataset._read

    def signalled(self, index):
        if in_worker():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return read(self, index)

    monkeypatch.setattr(ScoredImageDataset, '_read', signalled)


def test_verify_workers_ignore_stop_signals(scored, monkeypatch):
    signal_the_worker(monkeypatch)
    scored.verify(workers=2)  # before the fix: "DataLoader worker ... is killed by signal: Terminated"


def test_scoring_pass_workers_ignore_stop_signals(scored, monkeypatch):
    signal_the_worker(monkeypatch)

    class Means(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(1, 2, 3))[:, None].repeat(1, 7)

    scores = score_dataset(Means(), scored, torch.device('cpu'), batch_size=2, workers=2)
    expected = torch.stack([scored[k]['image'].mean() for k in range(4)]).numpy()
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-6)
