"""A stage-5 training run on disk and its rules; shared by the v1, v2 and v3 trainers.

A run lives in ``Layout.training_run(version, outdir)`` (:class:`ohlora.layout.TrainingRunFolder`): its
checkpoints under their published names in ``outdir``, and its own files in the run folder (the resolved
options ``training_options.json`` as NVlabs' training_options.json, the train log, the resume record, the
record of written files, the monitoring snapshots).

Lifecycle of a trainer::

    run = TrainingRun(layout.training_run('v1', outdir), options,
                      outputs={g_path: 'generator', d_path: 'discriminator'}, log_columns=COLUMNS)
    plan = run.plan(resume=args.resume, overwrite=args.overwrite)   # every check; writes nothing (*)
    if plan.finished:                                                 # a plain rerun of a finished run
        return
    ... load models, check the data (still nothing written) ...
    run.start(plan, provenance={...})      # creates the folder, writes the options, loads the log on resume
    result = run.train(loop, ctx, settings.tf32)   # --tf32, log flush on a NaN loss, then a barrier
    loop():  # from start_position(plan.record)
        for each step:
            ... train ...
            run.log.append({...})
            if checkpoint due:
                run.checkpoint(ResumeRecord(...))  # published files -> log -> resume record (the commit point)

(*) except, for a finished run, a published file the user deleted, which is written again from the record.

The rules :meth:`TrainingRun.plan` applies (one ``PipelineError`` line each, before anything is written):

* no record: a fresh run; ``--resume`` is refused (nothing to resume). A run folder holding the start of a run
  with other options (it stopped before its first checkpoint) is refused too.
* a record, and the options differ beyond :data:`ohlora.resume.RESUMABLE_OPTIONS`: refused, naming the
  difference, with or without ``--resume`` (a fresh run over another run is never started).
* a record, same options, no ``--resume``: if the run is finished with the same ``--epochs`` (or stopped early,
  :data:`ohlora.resume.STOPPED_EARLY`: then with any ``--epochs``), nothing is done and nothing written;
  otherwise refused, pointing at ``--resume``.
* a record, ``--resume``: continues; ``--epochs`` is the total, so a larger value extends a finished run and a
  value below the epochs already done is refused. (A trainer whose total is an epoch cap names its option with
  ``epochs_option``, e.g. ``--max-epochs``.)
* every published-name output must be absent or written by this run (:class:`ohlora.owned_files.OwnedFiles`),
  unless ``--overwrite``.

Order of a checkpoint: the published files, then the log, then the resume record. The record is the commit
point: after a crash, the run resumes from the last complete record and replays the few steps after it
(deterministically), rewriting the published files it owns.

Several processes (torchrun): every rank makes the same checks (so a bad input is the same one line everywhere),
but only the writer (``writer=True``: rank 0) writes; on the other ranks :meth:`TrainingRun.start`,
:meth:`TrainingRun.checkpoint` and the log write nothing.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from ohlora import atomic
from ohlora.devices import tf32
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import TrainingRunFolder
from ohlora.owned_files import OwnedFiles
from ohlora.resume import (RESUMABLE_OPTIONS, ResumeRecord, capture_rank_rng_states, check_resume_options,
                           load_resume_record, option_differences, save_resume_record)
from stylegan_modified.training_control import MixedPrecision, NonFiniteLoss, worker_error

WAY_OUT = 'choose another --root or --outdir'
T = TypeVar('T')


def cpu_state_dict(module: torch.nn.Module) -> dict:
    """A plain ``{name: tensor}`` copy on the CPU (the published files are CPU state_dicts, MODELS.md §6.1)."""
    return {name: tensor.detach().to('cpu', copy=True) for name, tensor in module.state_dict().items()}


def start_position(record: ResumeRecord | None) -> tuple[int, int, int, torch.Tensor | None]:
    """(epoch, batch, step, order) a training loop starts from: the start for a fresh run, else the record's
    position, with its epoch's data order when the record is inside an epoch (None: draw the epoch's order)."""
    if record is None:
        return 0, 0, 0, None
    return record.epoch, record.batch, record.step, record.data_order if record.batch else None


def describe_position(epoch: int, batch: int, step: int) -> str:
    """A place in a run, for messages: 'epoch E, batch B (step S)'."""
    return f'epoch {epoch}, batch {batch} (step {step})'


def checkpoint_kept(epoch: int, batch: int, step: int) -> str:
    """What a stop on a non-finite loss keeps (a trainer's ``last_checkpoint``), for the checkpoint at a position."""
    return f'the checkpoint of {describe_position(epoch, batch, step)} is kept'


def resume_record(ctx: DistContext, options: dict, epoch: int, batch: int, step: int, order: torch.Tensor | None,
                  contents: Callable[[], dict]) -> ResumeRecord | None:
    """The resume record of a checkpoint at (epoch, batch) after ``step`` steps. Every rank calls it (the RNG states
    are gathered); rank 0 gets it, the others None. ``contents()``, called on rank 0 alone (it makes the CPU copies of
    the models), gives the record's ``models``, ``optimizers``, ``scalers`` and ``extra``; the data ``order`` is kept
    inside an epoch only."""
    rng = capture_rank_rng_states(ctx)
    if not ctx.is_main:
        return None
    return ResumeRecord(options=options, epoch=epoch, batch=batch, step=step, data_order=order if batch else None,
                        rng=rng, **contents())


def restore_optimizers(record: ResumeRecord, optimizers: dict[str, torch.optim.Optimizer], amp: MixedPrecision,
                       problem: str) -> None:
    """The optimisers' states (by their names in the record) and the AMP scalers of a resume record; a state that
    does not fit is one line, ``problem: <why>``."""
    try:
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(record.optimizers[name])
    except (KeyError, ValueError) as exc:
        raise PipelineError(f'{problem}: {exc}') from None
    amp.load_state_dict(record.scalers)


class TrainLog:
    """A training log CSV with fixed ``columns`` and no index column.

    The header (a new log) or the rows a resume record keeps (:meth:`load`) are written atomically once; after that
    new rows are appended (:func:`ohlora.atomic.append_text`), ``flush_every`` at a time and at every checkpoint, so
    a long run writes each row once instead of rewriting the whole file at each flush (about 3 GB over a v3 run of
    20,000 rows). Rows reach the file only for finished steps, and a checkpoint flushes the log before its resume
    record, so the record's rows are always on disk; rows after it (or a partial last line of an interrupted
    append) are dropped by :meth:`load` on resume. Rows are formatted text (floats in Python's shortest round-trip
    form, ``None``/NaN as an empty cell), so a resumed run's log is byte for byte the uninterrupted run's.
    """

    def __init__(self, path: Path, columns: Sequence[str], flush_every: int = 10, enabled: bool = True):
        self.path = Path(path)
        self.columns = list(columns)
        self.flush_every = flush_every
        self.enabled = enabled  # False: a rank other than 0 of a distributed run keeps and writes nothing
        self.pending: list[str] = []   # rows not yet on disk
        self._on_disk = False          # the file holds the header and every row before ``pending``

    @staticmethod
    def _cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ''
        if isinstance(value, bool):
            return str(int(value))
        if isinstance(value, float):
            return repr(value)
        return str(value)

    def _line(self, cells: Sequence[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator='\n').writerow(cells)
        return buffer.getvalue()

    def reset(self) -> None:
        """A new log: the header alone (atomic)."""
        if not self.enabled:
            return
        self.pending = []
        atomic.write_text(self.path, self._line(self.columns))
        self._on_disk = True

    def load(self, keep: int) -> None:
        """Continue the log on disk: its first ``keep`` rows (those of the resume record) are kept; rows after them
        (steps after the record, a torn last line) are dropped, rewriting the file once."""
        if not self.path.is_file():
            raise PipelineError(f'{self.path} is missing, but the run\'s resume record needs its first {keep} rows; '
                                f'delete the run folder {self.path.parent} to start over, or {WAY_OUT}')
        lines = self.path.read_text(encoding='utf-8').splitlines(keepends=True)
        if not lines or lines[0] != self._line(self.columns):
            raise PipelineError(f'{self.path} does not have the columns {",".join(self.columns)}')
        if len(lines) - 1 < keep:
            raise PipelineError(f'{self.path} has {len(lines) - 1} rows, but the run\'s resume record needs {keep}')
        self.pending = []
        if len(lines) - 1 > keep:
            atomic.write_text(self.path, ''.join(lines[:1 + keep]))
        self._on_disk = True

    def append(self, values: dict) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f'not columns of {self.path.name}: {", ".join(sorted(unknown))}')
        if not self.enabled:
            return
        self.pending.append(self._line([self._cell(values.get(c)) for c in self.columns]))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """The pending rows to disk: appended, or with the header in one atomic write if the file is not yet
        this log's (no :meth:`reset` or :meth:`load` before)."""
        if not self.enabled:
            return
        if not self._on_disk:
            atomic.write_text(self.path, self._line(self.columns) + ''.join(self.pending))
            self._on_disk = True
        elif self.pending:
            atomic.append_text(self.path, ''.join(self.pending))
        self.pending = []


@dataclass
class RunPlan:
    """What :meth:`TrainingRun.plan` decided: continue from ``record`` (None: fresh), or nothing to do."""
    record: ResumeRecord | None
    finished: bool = False
    restored: tuple[Path, ...] = ()   # outputs of a finished run that were missing and were written again


def steps_done(record: ResumeRecord) -> int:
    """Log rows of a one-row-per-step log that belong to ``record``."""
    return record.step


class TrainingRun:
    """One run: ``files`` (its folder), its resolved ``options`` (plain JSON types; ``options['epochs']`` is the
    total, or the cap of a trainer with early stopping), its published outputs (path -> name of the model in the
    resume record; a model the record does not hold yet, e.g. the best epoch's before the first validation, is
    not written) and its log columns.

    For messages: ``epochs_option`` is the command-line option of the total, ``units`` the names of an epoch
    and a batch (e.g. ``('step groups', 'steps')``). ``log_rows(record)`` is the number of log rows a record
    keeps (default: one per step). ``writer`` False: a rank other than 0, which checks but writes nothing."""

    def __init__(self, files: TrainingRunFolder, options: dict, outputs: dict[Path, str], log_columns: Sequence[str],
                 changeable: Sequence[str] = RESUMABLE_OPTIONS, epochs_option: str = '--epochs',
                 units: tuple[str, str] = ('epochs', 'batches'),
                 log_rows: Callable[[ResumeRecord], int] = steps_done, writer: bool = True):
        self.files = files
        self.options = options
        self.outputs = {Path(p): name for p, name in outputs.items()}
        self.changeable = tuple(changeable)
        self.epochs_option = epochs_option
        self.units = units
        self.log_rows = log_rows
        self.writer = writer
        self.owned = OwnedFiles(files.written_files, base=files.outdir)
        self.log = TrainLog(files.train_log, log_columns, enabled=writer)
        self.provenance: dict = {}

    # --- before anything is written ---
    def plan(self, resume: bool, overwrite: bool = False) -> RunPlan:
        atomic.check_writable(self.files.outdir)
        folder, epochs = self.files.folder, self.options['epochs']
        record_path = self.files.resume_record
        if not record_path.is_file():
            if resume:
                raise PipelineError(f'there is no run to resume in {folder} (no {record_path.name}); '
                                    'start it without --resume')
            self._check_unfinished_start()
            self.owned.check(self.outputs, overwrite)
            return RunPlan(record=None)

        record = load_resume_record(record_path)
        if resume:
            check_resume_options(record.options, self.options, folder, self.changeable,
                                 {'epochs': self.epochs_option})
        else:
            differences = option_differences(record.options, self.options, self.changeable)
            if differences:
                raise PipelineError(f'{folder} holds another run ({"; ".join(differences[:3])}); rerun with its '
                                    f'options (and --resume to continue it), or {WAY_OUT}')
        epoch_unit, batch_unit = self.units
        option = self.epochs_option
        done = f'{record.epoch} {epoch_unit}' + (f' and {record.batch} {batch_unit}' if record.batch else '')
        if record.epoch > epochs or (record.epoch == epochs and record.batch):
            raise PipelineError(f'{folder} holds a run that has already done {done}; {option} is the total and '
                                f'cannot be below that (got {epochs})')
        if not resume:
            if record.completes(epochs) and (record.options.get('epochs') == epochs or record.stopped_early):
                return RunPlan(record=record, finished=True, restored=self._restore_missing(record))
            if record.completes(record.options.get('epochs', epochs)):
                raise PipelineError(f'{folder} holds a finished run of {record.options.get("epochs")} {epoch_unit}; '
                                    f'pass --resume {option} {epochs} to extend it, or {WAY_OUT}')
            raise PipelineError(f'{folder} holds an unfinished run ({done} of {record.options.get("epochs")}); '
                                f'pass --resume to continue it, or {WAY_OUT}')
        if record.completes(epochs):
            return RunPlan(record=record, finished=True, restored=self._restore_missing(record))
        self.owned.check(self.outputs, overwrite)
        return RunPlan(record=record)

    def _check_unfinished_start(self) -> None:
        """A folder without a record: a run that stopped before its first checkpoint, or foreign files."""
        folder = self.files.folder
        if not folder.is_dir() or not any(folder.iterdir()):
            return
        recorded = None
        if self.files.options_json.is_file():
            try:
                recorded = json.loads(self.files.options_json.read_text(encoding='utf-8')).get('options')
            except (ValueError, AttributeError):
                recorded = None
        if not isinstance(recorded, dict):
            raise PipelineError(f'{folder} holds files but no run record ({self.files.options_json.name}); '
                                f'move them away or {WAY_OUT}')
        differences = option_differences(recorded, self.options, self.changeable)
        if differences:
            raise PipelineError(f'{folder} holds the start of another run that wrote no checkpoint yet '
                                f'({"; ".join(differences[:3])}); delete it or {WAY_OUT}')

    def _restore_missing(self, record: ResumeRecord) -> tuple[Path, ...]:
        """A finished run writes nothing, except an output the user deleted, re-exported from the record."""
        missing = [p for p, name in self.outputs.items() if not p.exists() and name in record.models]
        if not self.writer:
            return tuple(missing)
        for path in missing:
            self.owned.torch_save(path, record.models[self.outputs[path]])
        return tuple(missing)

    # --- writing ---
    def start(self, plan: RunPlan, provenance: dict | None = None) -> None:
        """Create the run folder, write the options (keeping the first start's provenance), open the log."""
        if not self.writer:
            return
        try:
            self.files.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f'cannot write into {self.files.folder}: {exc.strerror or exc}') from None
        self.provenance = dict(provenance or {})
        if plan.record is not None and self.files.options_json.is_file():
            try:
                first = json.loads(self.files.options_json.read_text(encoding='utf-8')).get('provenance') or {}
            except (ValueError, AttributeError):
                first = {}
            self.provenance = {**first, **self.provenance}
        atomic.write_json(self.files.options_json, {'options': self.options, 'provenance': self.provenance})
        if plan.record is None:
            self.log.reset()
        else:
            self.log.load(keep=self.log_rows(plan.record))

    def train(self, loop: Callable[[], T], ctx: DistContext, tf32_enabled: bool, logs: Sequence[TrainLog] = ()) -> T:
        """``loop()`` (the trainer's epochs, after :meth:`start`) under ``--tf32``; then the other ranks go on once rank
        0's last checkpoint is on disk. On a non-finite loss the log (and ``logs``) get the rows up to the bad step
        first, for the diagnosis (a resume keeps only its own rows); a PipelineError from a DataLoader worker is
        reduced to its one line."""
        try:
            with tf32(tf32_enabled):
                result = loop()
        except NonFiniteLoss:
            self.log.flush()
            for log in logs:
                log.flush()
            raise
        except PipelineError as exc:
            raise worker_error(exc) from None
        ctx.barrier()
        return result

    def checkpoint(self, record: ResumeRecord) -> None:
        """The published files (owned writes), the log, then the resume record (the commit point)."""
        if not self.writer:
            return
        for path, name in self.outputs.items():
            if name in record.models:
                self.owned.torch_save(path, record.models[name])
        self.log.flush()
        save_resume_record(self.files.resume_record, record)
