"""Sharded runs of the inference stages: which share a process takes, its shard record, and the merge.

A stage run is split into ``n`` shards either by torchrun (rank *r* of world size *n* is shard r/n) or by
``--shard i/n`` (independent jobs, e.g. an array job of a cluster scheduler). Every shard writes its images (or
maps, chunks) directly under their final names, since the shares are disjoint, and its own record in the stage's
:class:`~ohlora.layout.ShardRecordsFolder`: what it ran with (``key``: the settings every shard must share) and
whether it has finished. The stage's shared records (z record, meta, skip list, score CSVs, settings) are written
by the merge alone, which reads every shard's record, refuses a missing, unfinished or mismatched shard in one
line, writes exactly the files one process would have written and removes the shard records. Under torchrun,
rank 0 merges after every rank has finished (:meth:`Sharding.finish`); with ``--shard`` the user runs
``merge_shards.py``.

A shard record also vouches for the files its shard wrote before the merge, as the stage's own record does for
one process, so a killed shard resumes like a killed single run.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ohlora import atomic
from ohlora.distributed import DistContext, Shard, context, parse_shard, shard_of
from ohlora.errors import PipelineError
from ohlora.layout import SHARD_RECORDS_FOLDER, ShardRecordsFolder
from ohlora.records import differences

logger = logging.getLogger(__name__)

RECORD_FORMAT = 'ohlora-shard-record'
# The ranks of a split run meet only at its end: a rank whose share finished first waits for the slowest one and
# then for rank 0's merge (a million-image z record alone takes minutes), far beyond NCCL's default 10 minutes,
# after which the whole job would be aborted. A rank that fails ends the job through torchrun, not this timeout.
END_OF_RUN_TIMEOUT = timedelta(hours=24)
MERGE_SCRIPT = 'stylegan_and_segmentation/merge_shards.py'


def merge_command(stage: str, root: Path | None = None, *options: str) -> str:
    """The command line that merges a split run's shards, as the messages show it (runnable from the repository
    root, where every script runs); without ``root`` the form a library default names."""
    where = [] if root is None else ['--root', str(root)]
    return ' '.join(['python', MERGE_SCRIPT, '--stage', str(stage), *where, *options])
T = TypeVar('T')

__all__ = ['Sharding', 'ShardRecords', 'start', 'check_shard_option']


def check_shard_option(text: str | None) -> Shard:
    """``--shard`` checked with the other options, before anything is read or written."""
    return parse_shard(text)


@dataclass(frozen=True)
class Sharding:
    """This process's share of a stage run: the whole run, a torchrun rank, or a ``--shard`` job."""
    ctx: DistContext
    shard: Shard

    @property
    def active(self) -> bool:
        """True for a share of a split run (its shared records are left to the merge)."""
        return not self.shard.whole

    @property
    def torchrun(self) -> bool:
        return self.ctx.distributed

    def describe(self) -> str:
        if self.torchrun:
            return f'rank {self.ctx.rank} of {self.ctx.world_size}'
        return f'shard {self.shard}'

    def agree(self, error: str | None) -> None:
        """Under torchrun: raise on every rank the first rank's error, so that no rank waits for one that failed."""
        errors = [e for e in self.ctx.all_gather_objects(error) if e is not None]
        if errors:
            raise PipelineError(errors[0])

    def total(self, count: int) -> int:
        """The sum of ``count`` over the ranks (just ``count`` outside torchrun)."""
        return sum(self.ctx.all_gather_objects(int(count)))

    def finish(self, merge: Callable[[], T]) -> T | None:
        """Under torchrun, once every rank has finished its share: rank 0 merges (so that one torchrun command gives
        the final files) and every rank waits for the merge; a merge error is raised on every rank. Outside
        torchrun nothing happens (a ``--shard`` job leaves the merge to ``merge_shards.py``); returns the merge's
        result on rank 0, None elsewhere."""
        if not self.torchrun:
            return None
        self.ctx.barrier()
        result, error = None, None
        if self.ctx.is_main:
            try:
                result = merge()
            except PipelineError as exc:
                error = str(exc)
        error = self.ctx.broadcast_object(error)
        if error is not None:
            raise PipelineError(error)
        return result


def start(device: torch.device, shard_text: str | None) -> Sharding:
    """This process's share: torchrun's rank (it starts the process group; ``--shard`` is then refused) or
    ``--shard i/n``. Under torchrun the device becomes the rank's own (``cuda:LOCAL_RANK``)."""
    shard = parse_shard(shard_text)
    ctx = context(device, timeout=END_OF_RUN_TIMEOUT)
    return Sharding(ctx, shard_of(ctx, shard))


class ShardRecords:
    """The shard records of one stage run (in ``files``): written by each shard, read and removed by the merge."""

    def __init__(self, files: ShardRecordsFolder, merge_command: str):
        self.files = files
        self.merge_command = merge_command  # how the user merges, for the messages

    @property
    def folder(self) -> Path:
        return self.files.folder

    def read_all(self) -> list[dict]:
        """Every shard record in the folder; one that is not a record of ours is a one-line error."""
        out = []
        for index, count, path in self.files.records():
            try:
                record = json.loads(path.read_text(encoding='utf-8'))
            except (OSError, ValueError, UnicodeDecodeError):
                record = None
            if not (isinstance(record, dict) and record.get('format') == RECORD_FORMAT
                    and record.get('index') == index and record.get('count') == count
                    and isinstance(record.get('key'), dict)):
                raise PipelineError(f'{path} is not a shard record written by this stage; move it away')
            out.append(record)
        return out

    def exist(self) -> bool:
        return bool(self.files.records())

    def refuse_unmerged(self) -> None:
        """A whole run does not add to the files of an unmerged split run: it would leave its records stale."""
        records = self.files.records()
        if records:
            count = records[0][1]
            raise PipelineError(f'{self.folder} holds the records of a run split into {count} shards that was not '
                                f'merged; finish its shards (--shard i/{count}) and merge them '
                                f'({self.merge_command}) first')

    def check_start(self, shard: Shard, key: dict) -> dict | None:
        """Before a shard writes anything: records of another split or of other settings are refused in one line
        (their files would mix with this shard's). Returns this shard's own earlier record, if any (a resume)."""
        own = None
        for record in self.read_all():
            if record['count'] != shard.count:
                raise PipelineError(f'{self.folder} holds the records of a run split into {record["count"]} shards; '
                                    f'run the same split (--shard i/{record["count"]}) and merge it '
                                    f'({self.merge_command}) before splitting into {shard.count}')
            changed = differences(record['key'], key)
            if changed:
                raise PipelineError(f'shard {record["index"]}/{record["count"]} in {self.folder} was run with other '
                                    f'settings ({", ".join(changed[:3])}); run every shard with the same options')
            if record['index'] == shard.index:
                own = record
        return own

    def write(self, shard: Shard, key: dict, *, finished: bool, **data) -> None:
        atomic.write_json(self.files.record(shard.index, shard.count),
                          {'format': RECORD_FORMAT, 'index': shard.index, 'count': shard.count, 'key': key,
                           'finished': finished, **data})

    def collect(self) -> list[dict]:
        """The records of every shard of the run, by index, all finished and made with the same key; else one
        line naming the shard to run (again)."""
        records = self.read_all()
        if not records:
            raise PipelineError(f'{self.folder} holds no shard records: run the shards (--shard i/n, or torchrun) '
                                'first')
        counts = sorted({r['count'] for r in records})
        if len(counts) > 1:
            raise PipelineError(f'{self.folder} holds the records of runs split into {" and ".join(map(str, counts))} '
                                'shards; keep one split')
        count = counts[0]
        by_index = {r['index']: r for r in records}
        missing = [i for i in range(count) if i not in by_index]
        if missing:
            raise PipelineError(f'shard {missing[0]}/{count} has no record in {self.folder}: run it '
                                f'(--shard {missing[0]}/{count}) before merging')
        first = by_index[0]
        for index in range(1, count):
            changed = differences(first['key'], by_index[index]['key'])
            if changed:
                raise PipelineError(f'shard {index}/{count} was run with other settings than shard 0/{count} '
                                    f'({", ".join(changed[:3])}); rerun it with the same options')
        unfinished = [i for i in range(count) if not by_index[i].get('finished')]
        if unfinished:
            raise PipelineError(f'shard {unfinished[0]}/{count} has not finished (see {self.folder}): rerun it '
                                f'(--shard {unfinished[0]}/{count}) before merging')
        return [by_index[i] for i in range(count)]

    def remove(self) -> None:
        """After a merge: the records and their data files go, and the folder (and its parent, when empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.name == SHARD_RECORDS_FOLDER:  # the root's folder of stages 1-3, once no stage has records there
            try:
                parent.rmdir()
            except OSError:
                pass
