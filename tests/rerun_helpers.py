"""Helpers for the rerun and bad-input tests: snapshots of a folder tree, one-line failures, killed processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ohlora.layout import CODE_ROOT
from script_runner import SCRIPTS, run_script


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (links not followed): file bytes, 'dir', or the link target."""
    entries = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[key] = ('link', os.readlink(path))
            elif path.is_dir():
                entries[key] = 'dir'
            else:
                entries[key] = path.read_bytes()
    return entries


def assert_refused(capsys, root: Path, script: str, *argv, match: str) -> str:
    """``script argv`` exits with status 2 and one ``error:`` line containing ``match``; nothing under ``root``
    changes. Returns the message."""
    before = snapshot(root) if root.exists() else None
    capsys.readouterr()
    status = run_script(script, *argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith('error: ') and '\n' not in err and match in err, err
    assert (snapshot(root) if root.exists() else None) == before
    return err


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob('.tmp-*')]


# --- processes --------------------------------------------------------------------------------------------

ENV = {**os.environ, 'PYTHONPATH': str(CODE_ROOT), 'OMP_NUM_THREADS': '1', 'OHLORA_NO_DOWNLOAD': '1'}


def script_command(script: str, argv, prelude: str = '') -> list[str]:
    """``python -c`` running a stage script as ``__main__`` after ``prelude`` (e.g. a slowed-down step)."""
    code = '\n'.join([
        'import runpy, sys',
        prelude,
        f'sys.argv = [{str(SCRIPTS / script)!r}] + {[str(a) for a in argv]!r}',
        f'runpy.run_path({str(SCRIPTS / script)!r}, run_name="__main__")',
    ])
    return [sys.executable, '-c', code]


def run_to_end(script: str, argv, prelude: str = '', cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(script_command(script, argv, prelude), capture_output=True, text=True, env=ENV,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ('Z', 'X')


def wait_ready(process: subprocess.Popen, script: str, ready, timeout: float, action: str) -> None:
    """Poll ``ready()`` until it holds; the script ending first, or ``timeout`` seconds passing, fails the test."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f'{script} ended before the test could {action}: {process.stderr.read()[-2000:]}')
        if time.monotonic() > deadline:
            raise AssertionError(f'{script} never reached the point to {action}')
        time.sleep(0.02)


def kill_when(script: str, argv, ready, prelude: str = '', timeout: float = 300) -> list[int]:
    """Start ``script``, ``kill -9`` it as soon as ``ready()`` holds; returns the pids of its child processes,
    which were alive at that moment."""
    process = subprocess.Popen(script_command(script, argv, prelude), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(process, script, ready, timeout, 'kill it')
        children = descendants(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    return children


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """The pids still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def sigterm_group_when(script: str, argv, ready, timeout: float = 300) -> tuple[int, str, list[int]]:
    """Start ``script`` in its own session and, once ``ready()`` holds, send SIGTERM to its whole process group (as
    Slurm, ``timeout`` or ``kill -- -PGID`` do: the DataLoader workers get it too). Returns its exit status, its
    stderr and the pids of its descendants at the signal that are still running 20 s after it ended."""
    process = subprocess.Popen(script_command(script, argv), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_ready(process, script, ready, timeout, 'signal it')
        group = descendants(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, err, wait_gone(group)


def kill_a_worker_after_the_stop(monkeypatch, trainer_class, armed_after: str, fatal_index: int, marker: Path):
    """The race a process-group SIGTERM can hit: a DataLoader worker gets it while starting, before it ignores it.

    Once ``trainer_class.step`` has run the step whose ``where`` ends with ``armed_after`` (e.g. ``'(step 2)'``),
    the worker that next reads dataset item ``fatal_index`` waits 0.5 s, sends SIGTERM to the main process and
    dies (SIGKILL). In-process runs only (the workers are forked from the test process)."""
    from stylegan_modified.datasets import ScoredImageDataset

    read, step, main = ScoredImageDataset.__getitem__, trainer_class.step, os.getpid()

    def getitem(self, index):
        if index == fatal_index and os.getpid() != main and marker.exists():
            marker.unlink()
            time.sleep(0.5)
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, index)

    def step_then_arm(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if self.where.endswith(armed_after):
            marker.touch()
        return result

    monkeypatch.setattr(ScoredImageDataset, '__getitem__', getitem)
    monkeypatch.setattr(trainer_class, 'step', step_then_arm)
