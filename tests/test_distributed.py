"""ohlora.distributed: torchrun's environment, shards, and the collectives the trainers use (2 gloo processes)."""
import json

import pytest
import torch

from distributed_helpers import run_ranks
from ohlora.distributed import DistContext, Shard, context, parse_shard, shard_of
from ohlora.errors import PipelineError


def test_shards_are_strided_and_cover_every_item_once():
    items = list(range(11))
    shares = [Shard(i, 3).take(items) for i in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shares, [])) == items
    assert Shard().whole and Shard().take(items) == items
    assert parse_shard('2/4') == Shard(2, 4) and parse_shard(None) == Shard()
    for bad in ('4/4', '-1/2', '1/0', 'a/b', '3'):
        with pytest.raises(PipelineError, match='--shard'):
            parse_shard(bad)


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    ctx = context(torch.device('cpu'))
    assert not ctx.distributed and ctx.is_main and ctx.shard.whole
    assert shard_of(ctx, Shard(1, 2)) == Shard(1, 2)
    assert torch.equal(ctx.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))


def test_a_split_inference_run_waits_for_its_slowest_rank_beyond_nccls_default(monkeypatch):
    """The ranks of a split run meet only at the end (the slowest share, then rank 0's merge), so its process group
    gets a long timeout; the trainers, which meet at every step, keep PyTorch's default."""
    from datetime import timedelta

    from ohlora import distributed, sharding
    from stylegan_modified.ddp import training_context

    started = []
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda **kwargs: started.append(kwargs))
    for name, value in (('WORLD_SIZE', '2'), ('RANK', '1'), ('LOCAL_RANK', '1')):
        monkeypatch.setenv(name, value)
    split = sharding.start(torch.device('cpu'), None)
    assert (split.ctx.rank, split.ctx.world_size) == (1, 2)
    training_context(torch.device('cpu'))
    assert started == [{'backend': 'gloo', 'timeout': timedelta(hours=24)}, {'backend': 'gloo'}]


def _collectives(rank, out_dir):
    ctx = context(torch.device('cpu'))
    mean = ctx.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
    record = {'rank': ctx.rank, 'world': ctx.world_size, 'main': ctx.is_main, 'mean': mean.tolist(),
              'shard': str(shard_of(ctx, Shard())), 'gathered': ctx.all_gather_objects(rank * 7),
              'broadcast': ctx.broadcast_object(f'from {rank}')}
    try:
        shard_of(ctx, Shard(0, 2))
    except PipelineError as exc:
        record['both'] = str(exc)
    (out_dir / f'rank{rank}.json').write_text(json.dumps(record))


def test_two_gloo_ranks_reduce_gather_and_split(tmp_path):
    run_ranks(_collectives, tmp_path)
    records = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert (record['rank'], record['world'], record['main']) == (rank, 2, rank == 0)
        assert record['mean'] == [0.5, 5.0]
        assert record['shard'] == f'{rank}/2'
        assert record['gathered'] == [0, 7]
        assert record['broadcast'] == 'from 0'
        assert 'drop --shard' in record['both']
    assert DistContext().is_main
