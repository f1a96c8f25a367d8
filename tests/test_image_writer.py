"""ohlora.image_writer: batch k is written while batch k + 1 renders, waited for before batch k + 2, errors one line."""
import threading

import cv2
import numpy as np
import pytest

from ohlora import image_writer
from ohlora.errors import PipelineError
from ohlora.layout import image_name


def image(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


def test_a_batch_is_written_in_the_background_and_waited_for_one_batch_later(tmp_path, monkeypatch):
    release, started, written = threading.Event(), threading.Event(), []
    real = image_writer.atomic.write_image

    def held_write(path, bgr):
        started.set()
        assert release.wait(10)
        real(path, bgr)

    monkeypatch.setattr(image_writer.atomic, 'write_image', held_write)
    with image_writer.BatchImageWriter(workers=2, on_written=written.append) as writer:
        writer.submit([(tmp_path / image_name(0), image(10)), (tmp_path / image_name(1), image(20))])
        assert started.wait(10)  # batch 0 is being written ...
        assert written == [] and not (tmp_path / image_name(0)).exists()  # ... and submit did not wait for it
        release.set()
        writer.submit([(tmp_path / image_name(2), image(30))])
        assert written == [2]  # batch 0 was waited for when batch 1 came, before batch 2 is rendered
    assert written == [2, 1]
    for n, value in enumerate((10, 20, 30)):
        assert cv2.imread(str(tmp_path / image_name(n)))[0, 0, 0] == value


def test_a_failed_write_stops_the_run_with_its_one_line_error(tmp_path):
    blocked = tmp_path / 'file'
    blocked.write_text('a file where a folder should be')
    with pytest.raises(PipelineError) as info:
        with image_writer.BatchImageWriter() as writer:
            writer.submit([(blocked / image_name(0), image(0))])
            writer.submit([(tmp_path / image_name(1), image(1))])
    assert '\n' not in str(info.value) and str(blocked) in str(info.value)
    assert not list(tmp_path.glob('.tmp-*'))


def test_ctrl_c_keeps_every_rendered_image(tmp_path, monkeypatch):
    """The images already handed over are written even when Ctrl-C comes before the writer threads pick them up
    (a resume need not render them again, and which files exist does not depend on thread timing)."""
    release = threading.Event()
    real = image_writer.atomic.write_image

    def held_write(path, bgr):
        assert release.wait(10)
        real(path, bgr)

    monkeypatch.setattr(image_writer.atomic, 'write_image', held_write)
    with pytest.raises(KeyboardInterrupt):
        with image_writer.BatchImageWriter(workers=1) as writer:
            writer.submit([(tmp_path / image_name(n), image(n)) for n in range(3)])  # one runs, two are queued
            threading.Timer(0.2, release.set).start()
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [image_name(n) for n in range(3)]
