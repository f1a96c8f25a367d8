"""How the pipeline reports while it runs: library modules log, the scripts show it.

Every library module logs through its own ``logger = logging.getLogger(__name__)`` and never prints; what a
script prints on stdout is its summary. :func:`setup_logging` (called by :func:`ohlora.cli.run`, so by every
script) installs ONE handler on the root logger that writes each message as one line to stderr through
``tqdm.write``, so a progress bar is redrawn below the message instead of being torn apart by it:

* WARNING: ``warning: <message>``; ERROR and above: ``error: <message>`` (no tracebacks);
* ``warnings.warn`` (e.g. a checkpoint with float64 tensors) arrives as ``warning: <message>`` too;
* INFO and DEBUG (progress notes such as ``resuming an interrupted --retrain; ...``): only with ``verbose``
  (the scripts' ``--verbose``), and only from this repository's packages; other libraries show WARNING and up.

So by default stderr holds warnings and, last, at most one ``error:`` line; what a run did is its summary on
stdout.
"""
from __future__ import annotations

import logging
import sys
import warnings

from tqdm import tqdm

from ohlora.layout import CODE_ROOT

# This repository's packages (the folders with an __init__.py): their loggers' notes are shown with --verbose.
PACKAGES = frozenset(init.parent.name for init in CODE_ROOT.glob('*/__init__.py'))
WARNINGS_LOGGER = 'ohlora.warnings'


class OneLineFormatter(logging.Formatter):
    """The message alone for INFO and below, ``warning: `` / ``error: `` before it above; exception details are
    left out (a user-facing message is one line)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f'error: {text}'
        if record.levelno >= logging.WARNING:
            return f'warning: {text}'
        return text


def shown(record: logging.LogRecord) -> bool:
    """Warnings and errors of any logger; lower levels only from the loggers of this repository's packages."""
    return record.levelno >= logging.WARNING or record.name.split('.', 1)[0] in PACKAGES


class TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write`` to the *current* ``sys.stderr`` (looked up per message, so redirections
    such as pytest's capture see it), keeping active progress bars intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the scripts: one ``warning:`` line through the handler."""
    text = str(message) if issubclass(category, UserWarning) else f'{category.__name__}: {message}'
    logging.getLogger(WARNINGS_LOGGER).warning('%s', text)


def setup_logging(verbose: bool = False) -> logging.Handler:
    """Install the one stderr handler (idempotent: a second call only sets the level again) and return it."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, TqdmHandler)), None)
    if handler is None:
        handler = TqdmHandler()
        handler.setFormatter(OneLineFormatter())
        handler.addFilter(shown)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    warnings.showwarning = _show_warning
    return handler
