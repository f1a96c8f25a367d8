"""Run records: what an earlier run wrote, from which inputs and with which settings, so a rerun knows what to reuse.

Every resume and skip decision is keyed on content, never on a file's name, size or time: weights by their
SHA-256 (computed once per run), inputs such as z vectors and images by the SHA-256 of their bytes. A record is
a JSON object ``{"settings": {...}, ...}``; a rerun with equal settings resumes, other settings are refused where
the outputs are the product (stages 1 and 6) and start over where they are derived (stages 2-4). Records are
written only when their content changes, so a finished rerun writes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ohlora import atomic
from ohlora.errors import PipelineError


# --- content digests -----------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    """SHA-256 (hex) of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_WEIGHTS_DIGESTS: dict[tuple, str] = {}


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a weights file, computed once per run: the download check and the run record share it.

    The cache key includes the inode, size and modification time, so a file replaced during the run is hashed
    again.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise PipelineError(f'cannot read {path}: {exc.strerror or exc}') from None
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHTS_DIGESTS:
        try:
            _WEIGHTS_DIGESTS[key] = sha256_of(path)
        except OSError as exc:
            raise PipelineError(f'cannot read {path}: {exc.strerror or exc}') from None
    return _WEIGHTS_DIGESTS[key]


def array_digest(values: np.ndarray) -> str:
    """SHA-256 of an array's float64 little-endian bytes (e.g. the base z a stage-6 folder was made from)."""
    return sha256_bytes(np.ascontiguousarray(values, dtype='<f8').tobytes())


# --- reading, comparing and writing records ------------------------------------------------------------------

def load_record(path: str | Path) -> dict | None:
    """A record used as a cache: None when it is missing or unusable (the work it describes is redone)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_record(path: str | Path, what: str, remedy: str) -> dict | None:
    """A record that vouches for outputs: None when absent, a one-line error when present but unusable."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise PipelineError(f'{path} is not a {what} (a JSON object written by this stage); {remedy}')
    return record


def flatten_settings(value, prefix: str = '') -> dict:
    """Nested dicts spread out with dotted keys (``'label.eyes': 1.8``) and tuples as lists (as JSON reads them
    back), so that a comparison names only what changed. Shared by the run records and the resume checks."""
    if not isinstance(value, dict):
        return {prefix or 'settings': list(value) if isinstance(value, tuple) else value}
    flat = {}
    for key, item in value.items():
        name = f'{prefix}.{key}' if prefix else str(key)
        flat.update(flatten_settings(item, name) if isinstance(item, dict) and item
                    else {name: list(item) if isinstance(item, tuple) else item})
    return flat


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:12] + '…'


def differences(recorded, wanted: dict) -> list[str]:
    """``'key old -> new'`` for every setting that differs between a record and the wanted settings."""
    before, after = flatten_settings(recorded if recorded is not None else {}), flatten_settings(wanted)
    keys = [k for k in after if before.get(k, '<absent>') != after[k]]
    keys += [k for k in before if k not in after]
    return [f'{k} {_short(before.get(k))} -> {_short(after.get(k))}' for k in keys]


def refuse_other_settings(record: dict | None, settings: dict, *, outputs: int, folder: Path, record_path: Path,
                          noun: str, remedy: str) -> None:
    """Refuse to add to ``outputs`` existing files made with other (or unknown) settings, naming the differences."""
    if not outputs:
        return
    if record is None:
        raise PipelineError(f'{folder} already holds {outputs} {noun} but no {record_path.name} says how they were '
                            f'made; {remedy}')
    changed = differences(record.get('settings'), settings)
    if changed:
        more = f' and {len(changed) - 3} more' if len(changed) > 3 else ''
        raise PipelineError(f'{folder} holds {noun} made with other settings ({", ".join(changed[:3])}{more}); '
                            f'rerun with the same settings, or {remedy}')


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Atomic write unless the file already holds exactly these bytes (a finished rerun writes nothing)."""
    path = Path(path)
    try:
        if path.is_file() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic.write_bytes(path, data)
    return True


def write_record(path: str | Path, settings: dict, **extra) -> bool:
    """``{"settings": settings, **extra}``, unless the file already records these settings (``extra`` describes
    them, e.g. the weights' file name, and is kept from the first run)."""
    current = load_record(path)
    if current is not None and current.get('settings') == settings and all(k in current for k in extra):
        return False
    atomic.write_json(path, {'settings': settings, **extra})
    return True


# --- what an output folder already holds ---------------------------------------------------------------------

@dataclass
class FolderScan:
    """The finished outputs of a folder (``{name: number}``) and the names that are not outputs of this kind."""
    found: dict[str, int] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)


def _kind(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return 'a symbolic link'
    if entry.is_dir(follow_symlinks=False):
        return 'a folder'
    return 'not a regular file'


def scan_outputs(folder: str | Path, pattern: re.Pattern, noun: str) -> FolderScan:
    """Match the names in ``folder`` against ``pattern`` (group 1: the number). Only regular files count as finished:
    a folder, a symbolic link (a loop, too) or a device under such a name is a one-line error, since a rerun could
    neither trust nor replace it. Temporary files of atomic writes are ignored."""
    folder = Path(folder)
    scan = FolderScan()
    if not folder.is_dir():
        return scan
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise PipelineError(f'cannot read the folder {folder}: {exc.strerror or exc}') from None
    for entry in entries:
        if entry.name.startswith(atomic.TMP_PREFIX):
            continue
        match = pattern.fullmatch(entry.name)
        if match is None:
            scan.others.append(entry.name)
        elif not entry.is_file(follow_symlinks=False):
            raise PipelineError(f'{entry.path} is {_kind(entry)}, not {noun}; move it away')
        else:
            scan.found[entry.name] = int(match.group(1))
    return scan


# --- resuming work in batches ----------------------------------------------------------------------------------

def aligned_batches(items: list, done, batch_size: int, shard=None) -> list[list]:
    """The batches ``items[k*B:(k+1)*B]`` that hold an item not ``done``, whole; with ``shard`` (an
    :class:`ohlora.distributed.Shard`) only the batches k it owns (k mod n = i).

    Float results can depend on which images share a batch; rendering the same batches as an uninterrupted run
    (and writing only what is missing) makes a resumed run's files byte-identical to it, at the price of at most
    one batch rendered twice. Sharding whole batches keeps that: every image of a split run is rendered in the
    batch one process would have rendered it in.
    """
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    return [batch for k, batch in enumerate(batches)
            if (shard is None or shard.owns(k)) and any(item not in done for item in batch)]


# --- z records -------------------------------------------------------------------------------------------------

def write_z_record(path: str | Path, img_nos: list[int], z: np.ndarray) -> bool:
    """``img_no,z0,...`` of every image of a folder (R1: every sampled z is recorded), float32 values, if changed.

    The record is derived from the run's settings, so it is rebuilt, never read back: a damaged one is repaired.
    """
    import pandas as pd

    z = np.asarray(z, dtype=np.float32)
    frame = pd.DataFrame(z, columns=[f'z{k}' for k in range(z.shape[1])])
    frame.insert(0, 'img_no', np.asarray(img_nos, dtype=np.int64))
    return write_if_changed(path, atomic.csv_text(frame).encode('utf-8'))
