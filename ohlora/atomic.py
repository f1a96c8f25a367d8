"""Atomic writes: every file is written to a temporary name in the same folder, then renamed (R14).

A crash therefore leaves either the old file or the new one, never a truncated image, CSV or checkpoint.
Temporary names start with ``.tmp-`` so that folder scans can ignore them.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

TMP_PREFIX = '.tmp-'


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode('utf-8'))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def write_csv(path: str | Path, frame, **to_csv_kwargs) -> None:
    """A pandas DataFrame as CSV (index off unless asked), LF line endings."""
    to_csv_kwargs.setdefault('index', False)
    buffer = io.StringIO()
    frame.to_csv(buffer, lineterminator='\n', **to_csv_kwargs)
    write_text(path, buffer.getvalue())


def torch_save(path: str | Path, obj) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def write_image(path: str | Path, image_bgr, params=()) -> None:
    """An image encoded by OpenCV with its defaults (JPEG quality 95, 4:2:0), chosen by the path's suffix."""
    import cv2

    ok, encoded = cv2.imencode(Path(path).suffix, image_bgr, list(params))
    if not ok:
        raise OSError(f'OpenCV could not encode {path}')
    write_bytes(path, encoded.tobytes())
