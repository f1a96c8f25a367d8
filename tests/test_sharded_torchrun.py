"""Split stage runs under torchrun: 2 gloo processes on the CPU (as ``torchrun --nproc_per_node 2`` starts them) run
the stage script; every rank renders its share, rank 0 merges. The root equals one process's (byte for byte for
stage 1; stage 3 up to near-tie pixels), rank 1 writes only its images and its shard record, and ``--shard`` under
torchrun is refused in one line.
"""
import contextlib
import io
import json

import pytest

from distributed_helpers import run_ranks
from ohlora.layout import Layout
from rerun_helpers import snapshot
from script_runner import run_script
from test_sharded_stages import maps_equal_but_near_ties, stage1_args, stage3_inputs


def _watch_writes(log: list) -> None:
    """Log the path of every atomic write of this process (every output goes through ohlora.atomic.atomic_path)."""
    from ohlora import atomic

    original = atomic.atomic_path

    @contextlib.contextmanager
    def logged(path):
        log.append(str(path))
        with original(path) as tmp:
            yield tmp

    atomic.atomic_path = logged


def _run_rank(rank: int, script: str, argv: list, out_dir) -> None:
    """One rank: the refusal of --shard under torchrun, then the stage script; what it wrote and said, as JSON."""
    from ohlora.errors import PipelineError
    from ohlora.sharding import start
    import torch

    written, err, out = [], io.StringIO(), io.StringIO()
    try:
        start(torch.device('cpu'), '0/2')
        refusal = None
    except PipelineError as exc:
        refusal = str(exc)
    _watch_writes(written)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = run_script(script, *argv)
    (out_dir / f'rank{rank}.json').write_text(json.dumps(
        {'status': status, 'written': written, 'stderr': err.getvalue(), 'stdout': out.getvalue(),
         'refusal': refusal}))


def ranks_report(out_dir) -> list[dict]:
    return [json.loads((out_dir / f'rank{rank}.json').read_text()) for rank in range(2)]


def test_stage1_under_two_gloo_ranks_equals_one_process(tmp_path, reference_dir):
    assert run_script('run_original_generator.py', *stage1_args(reference_dir, tmp_path / 'whole')) == 0
    root = tmp_path / 'ranks'
    run_ranks(_run_rank, 'run_original_generator.py', [str(a) for a in stage1_args(reference_dir, root)], tmp_path)
    assert snapshot(root) == snapshot(tmp_path / 'whole')  # images, meta, z record; no shard record left

    ranks = ranks_report(tmp_path)
    layout = Layout(root)
    for rank, report in enumerate(ranks):
        assert report['status'] == 0, report['stderr']
        assert 'drop --shard' in report['refusal']
        mine = [n for k in range(rank, 4, 2) for n in (2 * k, 2 * k + 1) if n < 7]  # batches of 2, k mod 2 = rank
        assert sorted(p for p in report['written'] if p.endswith('.jpg')) == \
            [str(layout.synthesized_image(n)) for n in mine]
    shared = {str(layout.synthesized_meta), str(layout.synthesized_z_csv)}
    record = str(layout.shard_records('1').record(1, 2))
    assert set(ranks[1]['written']) - {p for p in ranks[1]['written'] if p.endswith('.jpg')} == {record}
    assert shared <= set(ranks[0]['written'])
    assert ranks[0]['stdout'].startswith('wrote 7 images (0 already there) into ') and '(2 processes)' in \
        ranks[0]['stdout']
    assert ranks[1]['stdout'] == ''


def test_stage3_under_two_gloo_ranks_equals_one_process(tmp_path, synthetic_facexformer, facexformer_dir):
    for name in ('whole', 'ranks'):
        stage3_inputs(Layout(tmp_path / name).filtered_dir, facexformer_dir)
    args = ['--weights', synthetic_facexformer, '--device', 'cpu', '--no-progress', '--batch-size', 2]
    assert run_script('run_segmentation.py', *args, '--root', tmp_path / 'whole') == 0
    root = tmp_path / 'ranks'
    run_ranks(_run_rank, 'run_segmentation.py', [str(a) for a in args] + ['--root', str(root)], tmp_path)
    whole = snapshot(tmp_path / 'whole')
    maps_equal_but_near_ties(snapshot(root), whole)
    layout = Layout(root)
    assert layout.segmentation_meta.read_bytes() == whole['segmentation/segmentation_results/segmentation_meta.json']

    ranks = ranks_report(tmp_path)
    assert [r['status'] for r in ranks] == [0, 0], ranks[1]['stderr']
    shared = {str(layout.segmentation_meta), str(layout.segmentation_skipped_csv)}
    assert shared <= set(ranks[0]['written']) and not shared & set(ranks[1]['written'])
    # listing positions 1, 3, 5 (images 4, 9, 13): rank 1 parses 4 and skips 9 and 13
    assert sorted(p.rsplit('/', 1)[-1] for p in ranks[1]['written'] if p.endswith('.png')) == [
        'face_000004.png', 'parsing_000004.png', 'parsing_visualization_000004.png']
    assert ranks[0]['stdout'].startswith('parsed 4 images (0 already there); skipped 2')
