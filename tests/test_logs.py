"""ohlora.logs: one stderr handler for the scripts; warnings one line each, progress notes only with --verbose."""
import logging
import warnings

import pytest

from ohlora import logs
from script_runner import run_script


@pytest.fixture
def restored_logging(monkeypatch):
    """Whatever a test sets up is undone after it (the root level and warnings.showwarning)."""
    root = logging.getLogger()
    monkeypatch.setattr(warnings, 'showwarning', warnings.showwarning)
    level = root.level
    yield
    root.setLevel(level)


def our_handlers():
    return [h for h in logging.getLogger().handlers if isinstance(h, logs.TqdmHandler)]


def test_one_handler_warnings_one_line_notes_only_when_verbose(restored_logging, capsys):
    logs.setup_logging()
    logs.setup_logging()
    assert len(our_handlers()) == 1 and {'ohlora', 'cnn', 'stylegan_modified'} <= logs.PACKAGES
    ours, other = logging.getLogger('cnn.scoring'), logging.getLogger('some_library')
    ours.info('a progress note')
    ours.warning('image %06d skipped: %s', 1, 'unreadable')
    other.info('chatter of another library')
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = logs._show_warning  # as setup_logging leaves it; catch_warnings restored the default
        warnings.warn('tensors of dtype float64 were converted')
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err == ('warning: image 000001 skipped: unreadable\n'
                            'warning: tensors of dtype float64 were converted\n')

    logs.setup_logging(verbose=True)
    assert len(our_handlers()) == 1
    ours.info('a progress note')
    other.info('chatter of another library')
    other.warning('a warning of another library')
    assert capsys.readouterr().err == 'a progress note\nwarning: a warning of another library\n'


def test_scripts_show_progress_notes_with_verbose_and_keep_the_error_line_last(restored_logging, tmp_path, capsys):
    assert run_script('run_segmentation.py', '--root', tmp_path, '--verbose') == 2
    assert capsys.readouterr().err.startswith('error: ')
    assert logging.getLogger().level == logging.DEBUG  # --verbose switched the notes on ...
    assert run_script('run_segmentation.py', '--root', tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert logging.getLogger().level == logging.WARNING  # ... and the next run without it switched them off
