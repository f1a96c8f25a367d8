"""The conventions every stage script shares: common options, help with examples, one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ohlora.errors import PipelineError


def make_parser(description: str, examples: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, epilog='examples:\n' + examples.rstrip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_options(parser: argparse.ArgumentParser, *, batch_size: int | None = None, seed: bool = True,
                       compat: bool = True, batch_size_help: str = 'images per forward pass') -> None:
    parser.add_argument('--root', default=None, metavar='DIR',
                        help='folder that holds the stage folders (default: the repository root)')
    parser.add_argument('--device', default=None,
                        help='torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)')
    if batch_size is not None:
        parser.add_argument('--batch-size', type=positive_int, default=batch_size,
                            help=f'{batch_size_help} (default: {batch_size})')
    if seed:
        parser.add_argument('--seed', type=int, default=0, help='random seed; same seed, same files (default: 0)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    if compat:
        parser.add_argument('--compat', choices=['upstream'], default=None,
                            help="'upstream' switches on this stage's upstream behaviours (see README)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's ``main``; a :class:`PipelineError` becomes ``error: …`` on stderr and exit status 2."""
    try:
        main(argv)
    except PipelineError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted; finished outputs are kept and a rerun resumes', file=sys.stderr)
        sys.exit(130)
