"""The shared plumbing behind trustworthy reruns: file modes, write failures, temporaries of killed runs, run
records, download integrity and offline detection, option parsing (issue 10)."""
import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ohlora import atomic, cli, records
from ohlora.errors import PipelineError, WeightsUnavailable
from ohlora.layout import CODE_ROOT, Layout
from script_runner import SCRIPTS, script_main


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask():
    """Set a umask for one test, restore the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


# --- atomic writes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('mask', [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_a_normal_write_gets(tmp_path, umask, mask):
    umask(mask)
    normal = tmp_path / 'normal.txt'
    normal.write_text('x')
    atomic.write_text(tmp_path / 'a' / 'table.csv', 'x')
    atomic.write_image(tmp_path / 'a' / 'image.jpg', np.zeros((8, 8, 3), np.uint8))
    atomic.torch_save(tmp_path / 'a' / 'weights.pt', {})
    assert mode_of(normal) == 0o666 & ~mask
    for name in ('table.csv', 'image.jpg', 'weights.pt'):
        assert mode_of(tmp_path / 'a' / name) == 0o666 & ~mask, name  # was 0600 (mkstemp's mode)
    assert atomic.umask() == mask


def test_stage_output_files_follow_the_umask(tmp_path, umask, reference_dir, capsys):
    from script_runner import run_script

    umask(0o022)
    root = tmp_path / 'run'
    assert run_script('run_original_generator.py', '--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth',
                      '--num', 2, '--root', root, '--no-progress', '--device', 'cpu') == 0
    files = [p for p in (root / 'stylegan').rglob('*') if p.is_file()]
    assert len(files) == 4 and {mode_of(p) for p in files} == {0o644}


def test_a_failed_write_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / 'out' / 'table.csv'
    atomic.write_text(target, 'old\n')

    def disk_full(self, data):
        with open(self, 'wb') as handle:
            handle.write(data[:3])  # some bytes got through, then the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, 'write_bytes', disk_full)
    with pytest.raises(PipelineError) as info:
        atomic.write_text(target, 'new content\n')
    assert str(info.value) == f'cannot write {target}: No space left on device'
    monkeypatch.undo()
    assert target.read_text() == 'old\n' and sorted(p.name for p in target.parent.iterdir()) == ['table.csv']

    (tmp_path / 'out' / 'folder.csv').mkdir()  # a folder where the file goes
    with pytest.raises(PipelineError, match='folder.csv: Is a directory'):
        atomic.write_text(tmp_path / 'out' / 'folder.csv', 'x')
    (tmp_path / 'blocker').write_text('a file where a folder goes')
    with pytest.raises(PipelineError, match=r'cannot create the folder .*blocker/sub'):
        atomic.write_text(tmp_path / 'blocker' / 'sub' / 'x.csv', 'x')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['folder.csv', 'table.csv']


def test_file_too_large_mid_run_is_one_line_and_leaves_no_partial_file(tmp_path, reference_dir):
    """A real EFBIG: stage 1 under a 20 kB file-size limit fails on the z record, in one line, with no partial file."""
    root = tmp_path / 'run'
    limit = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
             f"sys.argv = ['x', '--weights', {str(reference_dir / 'genforce' / 'tiny_ckpt.pth')!r}, '--num', '60', "
             f"'--root', {str(root)!r}, '--no-progress', '--device', 'cpu']; "
             f"runpy.run_path({str(SCRIPTS / 'run_original_generator.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, '-c', limit], capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': str(CODE_ROOT), 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert re.fullmatch(r'error: cannot write \S+synthesize_results_z\.csv: File too large', err), err
    assert not list(root.rglob('.tmp-*')) and not Layout(root).synthesized_z_csv.exists()


def test_check_writable_fails_before_anything_and_creates_nothing(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(PipelineError, match=rf'cannot write into {blocker}/a/b: {blocker} is a file'):
        atomic.check_writable(blocker / 'a' / 'b')
    with pytest.raises(PipelineError, match=rf'cannot write into {blocker}: it is a file'):
        atomic.check_writable(blocker)
    atomic.check_writable(tmp_path / 'new' / 'folder')
    assert not (tmp_path / 'new').exists()


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale_file = tmp_path / f'.tmp-{dead.pid}-ab12.jpg'
    stale_dir = tmp_path / f'.tmp-{dead.pid}-download-cd34'
    live = tmp_path / f'.tmp-{os.getpid()}-ef56.jpg'
    resumable = tmp_path / '.tmp-download-synthesize_results'  # no pid: the published import resumes from it
    stale_file.write_bytes(b'half')
    stale_dir.mkdir()
    (stale_dir / 'x').write_text('x')
    live.write_bytes(b'being written')
    resumable.mkdir()
    atomic.check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, resumable.name])


# --- run records -------------------------------------------------------------------------------------------

def test_records_compare_by_content_and_name_what_changed(tmp_path):
    path = tmp_path / 'record.json'
    assert records.read_record(path, 'record', 'fix it') is None
    assert records.write_record(path, {'seed': 1, 'label': {'eyes': 1.8}}, weights_file='a.pth')
    stamp = path.stat().st_mtime_ns
    assert not records.write_record(path, {'seed': 1, 'label': {'eyes': 1.8}}, weights_file='b.pth')  # unchanged
    assert path.stat().st_mtime_ns == stamp
    assert records.differences({'seed': 1, 'label': {'eyes': 1.8}}, {'seed': 1, 'label': {'eyes': 0.5}}) == \
        ['label.eyes 1.8 -> 0.5']
    with pytest.raises(PipelineError, match=r'holds images made with other settings \(seed 1 -> 2\)'):
        records.refuse_other_settings(records.read_record(path, 'r', 'x'), {'seed': 2, 'label': {'eyes': 1.8}},
                                      outputs=3, folder=tmp_path, record_path=path, noun='images', remedy='x')
    for text in ('[]', '"a"', '{not json', ''):
        path.write_text(text)
        with pytest.raises(PipelineError, match='is not a record .*; fix it'):
            records.read_record(path, 'record', 'fix it')
        assert records.load_record(path) is None


def test_weights_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / 'w.pt'
    path.write_bytes(b'weights')
    calls = []
    real = records.sha256_of
    monkeypatch.setattr(records, 'sha256_of', lambda p: calls.append(p) or real(p))
    assert records.weights_digest(path) == records.weights_digest(path) == records.sha256_bytes(b'weights')
    assert len(calls) == 1
    path.write_bytes(b'other weights')
    assert records.weights_digest(path) == records.sha256_bytes(b'other weights')


def test_only_regular_files_count_as_outputs(tmp_path):
    pattern = re.compile(r'(\d{6})\.jpg')
    (tmp_path / '000001.jpg').write_bytes(b'x')
    (tmp_path / 'notes.txt').write_text('x')
    assert records.scan_outputs(tmp_path, pattern, 'an image').found == {'000001.jpg': 1}
    for make in (lambda p: p.mkdir(), lambda p: p.symlink_to(p), lambda p: p.symlink_to(tmp_path / '000001.jpg')):
        odd = tmp_path / '000013.jpg'
        make(odd)
        with pytest.raises(PipelineError, match=r'000013\.jpg is a (folder|symbolic link), not an image'):
            records.scan_outputs(tmp_path, pattern, 'an image')
        odd.rmdir() if odd.is_dir() and not odd.is_symlink() else odd.unlink()


# --- downloads -----------------------------------------------------------------------------------------------

@pytest.fixture()
def fake_hub(monkeypatch):
    """Downloads allowed, the host reachable, the hub serving fixed bytes."""
    import ohlora.weights as weights

    served = {'data': b'published weights' * 100, 'calls': 0}

    def download(repo, filename, local_dir):
        served['calls'] += 1
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(served['data'])
        os.chmod(path, 0o600)  # as the hub's temporaries are
        return str(path)

    monkeypatch.setenv('OHLORA_NO_DOWNLOAD', '0')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    for name in weights.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: socket.socket())
    monkeypatch.setattr('huggingface_hub.hf_hub_download', download)
    return served


def test_downloads_record_size_and_sha256_and_later_use_checks_them(tmp_path, fake_hub, umask, capsys):
    from ohlora.weights import fetch

    umask(0o022)
    layout = Layout(tmp_path)
    path = fetch('v3_generator', layout)
    sidecar = layout.download_record(path)
    record = json.loads(sidecar.read_text())
    assert record['size'] == len(fake_hub['data']) and record['sha256'] == records.sha256_bytes(fake_hub['data'])
    assert sidecar.name == 'stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth.download.json'
    assert mode_of(path) == 0o644 and not list(path.parent.glob('.tmp-*'))
    assert fetch('v3_generator', layout) == path and fake_hub['calls'] == 1  # cached and still intact

    path.write_bytes(fake_hub['data'][:-7])  # truncated
    with pytest.raises(PipelineError, match=r'has 1693 bytes, but 1700 were downloaded .*truncated or replaced'):
        fetch('v3_generator', layout)
    path.write_bytes(fake_hub['data'][::-1])  # swapped: same size, other bytes
    with pytest.raises(PipelineError, match='is not the file that was downloaded .*SHA-256 differs'):
        fetch('v3_generator', layout)
    sidecar.write_text('[]')
    with pytest.raises(PipelineError, match='is not a download record'):
        fetch('v3_generator', layout)


def test_no_published_checksum_is_claimed():
    from ohlora.weights import SOURCES

    assert all(source.sha256 is None and source.size is None for source in SOURCES.values())


def test_offline_is_one_quick_attempt_and_one_line(tmp_path, fake_hub, monkeypatch, capsys):
    from ohlora.weights import fetch

    attempts = []

    def unreachable(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError(errno.EHOSTUNREACH, 'No route to host')

    monkeypatch.setattr(socket, 'create_connection', unreachable)
    with pytest.raises(WeightsUnavailable) as info:
        fetch('gender_model_0', Layout(tmp_path))
    message = str(info.value)
    assert '\n' not in message and 'no connection to huggingface.co: No route to host' in message
    assert '--weights DIR (a folder holding all ten fold files)' in message  # stage 2 takes a folder
    assert attempts == [(('huggingface.co', 443), 3.0)] and fake_hub['calls'] == 0  # no retries, no hub call
    assert capsys.readouterr().err == '' and not (tmp_path / 'cnn').exists()


def test_stage2_offline_names_the_weights_folder_option(tmp_path, capsys):
    from script_runner import run_script
    from ohlora import atomic as atomic_writes

    layout = Layout(tmp_path)
    atomic_writes.write_image(layout.synthesized_image(0), np.zeros((256, 256, 3), np.uint8))
    assert run_script('run_cnn.py', '--root', tmp_path, '--no-progress', '--workers', 0) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.endswith('pass --weights DIR (a folder holding all ten fold files)'), err


# --- options -------------------------------------------------------------------------------------------------

def test_negative_values_and_lists_follow_their_option():
    parser = cli.make_parser('d', 'e')
    parser.add_argument('--values')
    parser.add_argument('--eyes', type=float)
    args = parser.parse_args(['--values', '-1,0,1', '--eyes', '-1e-1'])
    assert (args.values, args.eyes) == ('-1,0,1', -0.1)
    assert parser.parse_args(['--eyes', '-inf']).eyes == float('-inf')  # then refused by check_float, in one line
    with pytest.raises(PipelineError, match=r'--eyes must be in \[-1000, 1000\], got -1e\+308'):
        cli.check_float('--eyes', -1e308)
    with pytest.raises(PipelineError, match='--trunc-psi nan is not a finite number'):
        cli.check_float('--trunc-psi', float('nan'))


@pytest.mark.parametrize('script', sorted(p.name for p in SCRIPTS.glob('*.py')))
def test_help_prints_no_doubled_percent_signs(script, capsys):
    with pytest.raises(SystemExit):
        script_main(script)(['--help'])
    out = capsys.readouterr().out
    assert 'examples:' in out and '%%' not in out


def test_usage_errors_are_one_line(tmp_path, capsys):
    from rerun_helpers import assert_refused

    for argv, message in [(['--num', 'abc'], "argument --num: invalid int value: 'abc' (see --help)"),
                          (['--frobnicate'], 'unrecognized arguments: --frobnicate (see --help)'),
                          (['--trunc-psi'], 'argument --trunc-psi: expected one argument (see --help)')]:
        assert_refused(capsys, tmp_path, 'run_original_generator.py', '--root', tmp_path, *argv, match=message)
    assert not list(tmp_path.iterdir())


def test_a_folder_where_an_output_file_goes_is_refused_before_anything(tmp_path, capsys, reference_dir):
    from rerun_helpers import assert_refused

    layout = Layout(tmp_path)
    cases = [('run_original_generator.py', layout.synthesized_z_csv,
              ['--weights', reference_dir / 'genforce' / 'tiny_ckpt.pth']),
             ('run_cnn.py', layout.cnn_merged_csv, ['--weights', tmp_path / 'nowhere']),
             ('run_segmentation.py', layout.segmentation_skipped_csv, ['--images', tmp_path / 'images']),
             ('compute_property_scores.py', layout.property_scores_stats(2), [])]
    (tmp_path / 'images').mkdir()
    atomic.write_image(tmp_path / 'images' / '000001.jpg', np.zeros((64, 64, 3), np.uint8))
    atomic.write_image(layout.synthesized_image(1), np.zeros((64, 64, 3), np.uint8))
    for script, path, extra in cases:
        path.mkdir(parents=True)
        assert_refused(capsys, tmp_path, script, '--root', tmp_path, '--no-progress', *extra,
                       match=f'cannot write {path}: it is a folder; move it away')
        path.rmdir()
