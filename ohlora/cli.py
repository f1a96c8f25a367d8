"""The conventions every stage script shares: common options, help with examples, one-line errors, one log handler."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from typing import Callable

from ohlora.errors import PipelineError
from ohlora.logs import setup_logging

# argparse takes only '-1' or '-.5' for a negative value; '--values -1,0,1', '--eyes -1e3' and '--eyes -inf' would
# read as unknown options ("expected one argument"). No option of ours starts with a digit, so anything that
# starts like a number is a value.
NEGATIVE_VALUE = re.compile(r'^-(?:\d|\.\d|inf|nan)', re.IGNORECASE)

# Largest magnitude accepted for a float option: far beyond any meaningful value (property z-scores lie within
# about +-11, truncation psi near [0, 1]), far below where float32 maths overflows into NaN images.
FLOAT_LIMIT = 1000.0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`PipelineError` (one ``error:`` line, exit status 2, via :func:`run`)
    instead of the usage text plus an error line."""

    def error(self, message: str):
        raise PipelineError(f'{message} (see --help)')


def make_parser(description: str, examples: str) -> argparse.ArgumentParser:
    """A parser whose help shows the description and the examples as written (no %-formatting of either)."""
    parser = OneLineParser(description=description, epilog='examples:\n' + examples.rstrip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser._negative_number_matcher = NEGATIVE_VALUE
    return parser


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
    parser.add_argument('--verbose', action=VerboseAction, help='also log progress notes on stderr')
    if compat:
        parser.add_argument('--compat', choices=['upstream'], default=None,
                            help="'upstream' switches on this stage's upstream behaviours (see README)")


def add_scale_options(parser: argparse.ArgumentParser, *, amp: bool = True, unit: str = 'images') -> None:
    """``--shard I/N`` (one of N independent jobs; torchrun splits by rank instead) and ``--amp`` (bfloat16 autocast,
    opt-in) for the stages that spread their work (docs/scale-out-inference.md)."""
    parser.add_argument('--shard', default=None, metavar='I/N',
                        help=f'take share I of N (0-based) of the {unit}, as one of N independent jobs; then merge '
                             'with merge_shards.py (under torchrun the ranks split the work instead)')
    if amp:
        parser.add_argument('--amp', action='store_true',
                            help='run the networks under bfloat16 autocast (faster on recent GPUs; outputs within '
                                 'the tolerance stated in docs/scale-out-inference.md, recorded in the settings)')


class VerboseAction(argparse.Action):
    """``--verbose``: switches the progress notes of :mod:`ohlora.logs` on as soon as it is parsed."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        setup_logging(verbose=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def check_float(option: str, value: float, low: float = -FLOAT_LIMIT, high: float = FLOAT_LIMIT) -> float:
    """``value`` if finite and in [low, high]; else a one-line error naming the option (checked before any work)."""
    if not math.isfinite(value):
        raise PipelineError(f'{option} {value} is not a finite number')
    if not low <= value <= high:
        raise PipelineError(f'{option} must be in [{low:g}, {high:g}], got {value:g}')
    return value


def request_from(request_type, args: argparse.Namespace, **values):
    """A script's library request (a dataclass) from its parsed options: each field takes the option of the same
    name, ``progress`` is ``not --no-progress`` and a ``bool`` ``compat`` is ``--compat upstream``; ``values`` set
    the other fields (options under another name, or derived)."""
    fields = {field.name: field for field in dataclasses.fields(request_type)}
    options = vars(args)
    chosen = {name: options[name] for name in fields if name in options}
    if 'progress' in fields:
        chosen['progress'] = not options.get('no_progress', False)
    if 'compat' in fields and fields['compat'].type in (bool, 'bool'):
        chosen['compat'] = options.get('compat') == 'upstream'
    chosen.update(values)
    return request_type(**chosen)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's ``main`` with the pipeline's log handler (:func:`ohlora.logs.setup_logging`: messages and
    warnings one line each on stderr); a :class:`PipelineError` becomes ``error: …`` on stderr and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except PipelineError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted; finished outputs are kept and a rerun resumes', file=sys.stderr)
        sys.exit(130)
    finally:
        from ohlora.distributed import close

        close()  # the torchrun process group of a sharded stage, if one was started
