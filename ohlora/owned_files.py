"""The no-overwrite rule: a run replaces only files that it wrote itself.

Trainers write their checkpoints under published names (``stylegan_gen_fine_tuned_v1.pth``, ...), the names
a downloaded published file also has. So before a run writes such a file, :class:`OwnedFiles` checks that the
file is absent or holds bytes this run wrote (by SHA-256, recorded in a JSON manifest of the run); anything
else is refused in one line that names the file and the way out (another ``--root``/``--outdir``, or
``--overwrite``).

Crash safety: the hash of the new bytes is added to the manifest *before* the file is replaced, and the old
hash dropped only after, so an interruption between the two steps never makes the run's own file look foreign.

    owned = OwnedFiles(run.written_files, base=run.outdir)
    owned.check([g_path, d_path], overwrite=args.overwrite)   # before anything is written
    owned.torch_save(g_path, generator_state_dict)             # each write re-checks
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.records import sha256_of

DEFAULT_WAY_OUT = 'choose another --root or --outdir, or pass --overwrite to replace it'


class OwnedFiles:
    """The files a run wrote (path relative to ``base`` -> accepted SHA-256s), kept in ``manifest``."""

    def __init__(self, manifest: str | Path, base: str | Path, way_out: str = DEFAULT_WAY_OUT):
        self.manifest = Path(manifest)
        self.base = Path(base)
        self.way_out = way_out
        self.overwrite = False  # set by check(): the user allowed replacing foreign files once

    def _key(self, path: Path) -> str:
        return Path(os.path.relpath(Path(path).absolute(), self.base.absolute())).as_posix()

    def _read(self) -> dict[str, list[str]]:
        if not self.manifest.is_file():
            return {}
        try:
            data = json.loads(self.manifest.read_text(encoding='utf-8'))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise PipelineError(f'{self.manifest} is not a record of written files; delete the run folder '
                                f'{self.manifest.parent} or choose another --root or --outdir')
        return data

    def owns(self, path: str | Path) -> bool:
        """True if ``path`` is absent or holds bytes this run wrote."""
        return self._owned_hash(Path(path))[0]

    def _owned_hash(self, path: Path) -> tuple[bool, str | None]:
        """(owned, SHA-256 of the present file or None); each file is hashed once per call."""
        if not path.exists():
            return True, None
        if not path.is_file():
            return False, None
        digest = sha256_of(path)
        return digest in self._read().get(self._key(path), []), digest

    def _refusal(self, path: Path) -> PipelineError:
        return PipelineError(f'{path} exists and was not written by this run (a downloaded or another run\'s '
                             f'file?); it is never overwritten: {self.way_out}')

    def check(self, paths: Iterable[str | Path], overwrite: bool = False) -> None:
        """Refuse (one line) if any of ``paths`` exists and was not written by this run, unless ``overwrite``; a
        folder (or anything but a file) under such a name is refused even then, before any work is done."""
        paths = list(paths)
        atomic.check_replaceable(*paths)
        self.overwrite = self.overwrite or overwrite
        if self.overwrite:
            return
        for path in paths:
            if not self.owns(path):
                raise self._refusal(Path(path))

    def _set(self, key: str, hashes: list[str]) -> None:
        data = self._read()
        data[key] = hashes
        atomic.write_json(self.manifest, data)

    def write_bytes(self, path: str | Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` atomically under the rule; False (nothing written) if it already holds it."""
        path = Path(path)
        owned, present = self._owned_hash(path)
        if not owned and not self.overwrite:
            raise self._refusal(path)
        digest = hashlib.sha256(data).hexdigest()
        key = self._key(path)
        if present == digest:
            if self._read().get(key) != [digest]:
                self._set(key, [digest])
            return False
        previous = [h for h in self._read().get(key, []) if h != digest]
        self._set(key, previous + [digest])
        atomic.write_bytes(path, data)
        self._set(key, [digest])
        return True

    def torch_save(self, path: str | Path, obj) -> bool:
        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return self.write_bytes(path, buffer.getvalue())
