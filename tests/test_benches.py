"""The benchmarks stay runnable as the library changes under them: every script's --help, and a tiny run of those
that drive the stage-6 and evaluation APIs (tests never time anything; the figures are docs/benchmarks.md's)."""
import runpy
import sys

import pytest

from ohlora.layout import CODE_ROOT

BENCH = CODE_ROOT / 'bench'
SCRIPTS = sorted(p.name for p in BENCH.glob('bench_*.py') if p.name != 'bench_common.py')


def run_bench(monkeypatch, name: str, *argv) -> int:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import bench_common by its plain name
    monkeypatch.setattr(sys, 'argv', [f'bench/{name}', *map(str, argv)])
    try:
        runpy.run_path(str(BENCH / name), run_name='__main__')
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_benchmark_has_help_with_its_commands(name, monkeypatch, capsys):
    assert run_bench(monkeypatch, name, '--help') == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: ') and f'python bench/{name}' in out


def test_the_stage6_benchmark_runs_through_the_library(monkeypatch, capsys):
    assert run_bench(monkeypatch, 'bench_fine_tuned_generator.py', '--device', 'cpu', '--images', 2,
                     '--batch-sizes', 2, '--repeat', 1, '--sweep-z', 1) == 0
    out = capsys.readouterr().out
    assert 'generate, B=2  :' in out and 'vs the per-image loop' in out and 'sweep, 1 z x 5 values' in out


def test_the_evaluation_benchmark_runs_through_the_library(monkeypatch, capsys):
    assert run_bench(monkeypatch, 'bench_evaluation.py', '--device', 'cpu', '--z', 1, '--batch-sizes', 3,
                     '--no-identity') == 0
    out = capsys.readouterr().out
    assert 'per image (batch 1):' in out and 'batch   3:' in out and 'mean r differs by' in out
