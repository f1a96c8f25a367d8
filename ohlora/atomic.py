"""Atomic writes: every file is written to a temporary name in the same folder, then renamed (R14).

A crash therefore leaves either the old file or the new one, never a truncated image, CSV or checkpoint. The one
exception is :func:`append_text`, for logs that grow by rows and whose committed row count is known elsewhere.
Temporary names are ``.tmp-<pid>h<host>-<random><suffix>``: folder scans ignore them, and a later run removes
those of processes of this machine that no longer exist (a run killed with ``kill -9`` cannot clean up after
itself). ``<host>`` (8 hex digits of the host name's SHA-256) keeps a job on one machine from removing the live
temporaries of a job on another that writes into the same shared folder (``--shard`` jobs, multi-node torchrun),
whose process ids mean nothing here. Names without it (written before it existed) count as this machine's.

A write that fails (disk full, file too large, a folder in the way, no permission) raises a one-line
:class:`PipelineError` naming the path; the temporary file is removed, the old file stays as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import threading
from pathlib import Path

from ohlora.errors import PipelineError

TMP_PREFIX = '.tmp-'
_OWNED_TMP = re.compile(re.escape(TMP_PREFIX) + r'(\d+)(?:h([0-9a-f]{8}))?-')  # groups: pid, host
HOST_TAG = hashlib.sha256(socket.gethostname().encode('utf-8')).hexdigest()[:8]


def temporary_name(path: Path, tag: str = '') -> Path:
    """A fresh temporary name beside ``path`` that records this process and machine (see
    :func:`remove_stale_temporaries`)."""
    return path.parent / f'{TMP_PREFIX}{os.getpid()}h{HOST_TAG}-{tag}{secrets.token_hex(6)}{path.suffix}'


def write_error(path: Path, exc: OSError) -> PipelineError:
    return PipelineError(f'cannot write {path}: {exc.strerror or exc}')


def _create_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f'cannot create the folder {path.parent}: {exc.strerror or exc}') from None


def _create_temporary(path: Path) -> Path:
    """An empty new file beside ``path``, created with mode 0o666 so the kernel applies the user's umask, exactly
    as for a normal write (``tempfile.mkstemp`` would make it 0600, and the mode survives the rename)."""
    for _ in range(100):
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f'no free temporary name beside {path}')


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    _create_parent(path)
    try:
        tmp = _create_temporary(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode('utf-8'))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to the file ``path`` (a log that grows by whole rows, so that a long run does not rewrite it
    at every flush). Not a replacement: a crash in the middle can leave a partial last line, so a reader must know
    how many rows are committed (``stylegan_modified.training_run.TrainLog.load`` keeps the rows its resume record
    counts and rewrites the file atomically without the rest). A failed write is one line naming the path."""
    path = Path(path)
    try:
        with open(path, 'a', encoding='utf-8', newline='') as stream:
            stream.write(text)
    except OSError as exc:
        raise write_error(path, exc) from None


def json_text(obj) -> str:
    """The project's JSON form: 2-space indent, sorted keys, a final newline (stable bytes for equal content)."""
    return json.dumps(obj, indent=2, sort_keys=True) + '\n'


def write_json(path: str | Path, obj) -> None:
    write_text(path, json_text(obj))


def csv_text(frame, **to_csv_kwargs) -> str:
    """A pandas DataFrame as CSV text (index off unless asked), LF line endings."""
    to_csv_kwargs.setdefault('index', False)
    buffer = io.StringIO()
    frame.to_csv(buffer, lineterminator='\n', **to_csv_kwargs)
    return buffer.getvalue()


def write_csv(path: str | Path, frame, **to_csv_kwargs) -> None:
    write_text(path, csv_text(frame, **to_csv_kwargs))


def torch_save(path: str | Path, obj) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def encode_image(suffix: str, image_bgr, params=()) -> bytes:
    """An image encoded by OpenCV with its defaults (JPEG quality 95, 4:2:0), the format chosen by ``suffix``."""
    import cv2

    ok, encoded = cv2.imencode(suffix, image_bgr, list(params))
    if not ok:
        raise PipelineError(f'OpenCV could not encode a {suffix} image of shape {getattr(image_bgr, "shape", "?")}')
    return encoded.tobytes()


def write_image(path: str | Path, image_bgr, params=()) -> None:
    write_bytes(path, encode_image(Path(path).suffix, image_bgr, params))


# --- before a stage writes: can it, and what did killed runs leave? ----------------------------------------

def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that processes of this machine which no longer run left in
    ``folder`` (another machine's are left alone: its process ids cannot be checked from here)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _OWNED_TMP.match(entry.name)
        if match is None or match.group(2) not in (None, HOST_TAG) or _process_exists(int(match.group(1))):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def check_writable(*folders: str | Path) -> None:
    """Fail in one line, before anything runs, when a folder cannot be created or written (a file in the way, a
    read-only place); folders that exist lose the temporary files of killed runs. Nothing is created."""
    for folder in map(Path, folders):
        probe = folder
        while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            kind = 'a file' if probe.is_file() else 'not a folder'
            raise PipelineError(f'cannot write into {folder}: {"it" if probe == folder else probe} is {kind}')
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PipelineError(f'cannot write into {folder}: {probe} is not writable')
        if probe == folder:
            remove_stale_temporaries(folder)


def check_replaceable(*paths: str | Path) -> None:
    """Fail in one line, before anything runs, when an output file's name is taken by a folder (or anything else
    that is not a regular file or a link to one): the rename at the end of its write would fail mid-run."""
    for path in map(Path, paths):
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = 'a folder' if path.is_dir() else 'not a regular file'
            raise PipelineError(f'cannot write {path}: it is {kind}; move it away')


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def give_default_mode(path: str | Path) -> None:
    """Give a file that another tool wrote (a download) the mode a normal write would have given it."""
    os.chmod(path, 0o666 & ~umask())
