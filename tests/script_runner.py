"""Run a stage script's ``main`` in-process (no torch re-import per call), as the command line would."""
import runpy
from pathlib import Path

from ohlora.cli import run
from ohlora.layout import CODE_ROOT

SCRIPTS = CODE_ROOT / 'stylegan_and_segmentation'


def script_main(name: str):
    return runpy.run_path(str(SCRIPTS / name), run_name='script_under_test')['main']


def run_script(name: str, *argv) -> int:
    """Exit status of ``python stylegan_and_segmentation/<name> argv…`` (0, or the SystemExit code)."""
    try:
        run(script_main(name), [str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}
