"""Benchmark: stage 1 in one process against the same run under torchrun with N processes (and, with --amp, the
one-process run under bfloat16 autocast), as a user starts them, timed from the outside.

A GenForce zoo checkpoint with random weights of the chosen widths is written to a temporary folder (the weights
cost the same time as the real ones). Then ``run_original_generator.py`` runs once in one process and once under
``torchrun --standalone --nproc_per_node N`` (gloo and one thread per process on the CPU, one GPU per rank on
CUDA); the wall times (process start and torch import included, as a user sees them) and their ratio are
printed, and the two roots are compared byte for byte. With --amp the one-process run is repeated under
``--amp`` and its images compared with the float32 ones in uint8 levels.

    python bench/bench_sharded_stage1.py                                 # CPU: tiny widths, 64 images, 2 processes
    python bench/bench_sharded_stage1.py --config full --num 16 --batch-size 4 --amp
    python bench/bench_sharded_stage1.py --device cuda --config full --num 2048 --batch-size 32 --processes 4
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ohlora.cli import positive_int
from ohlora.layout import CODE_ROOT, GENFORCE_ZOO_FILE, Layout
from stylegan.stylegan_generator import StyleGANGenerator
from bench_common import bench_parser
from bench_inference_options import GENERATOR_CONFIGS

SCRIPT = CODE_ROOT / 'stylegan_and_segmentation' / 'run_original_generator.py'


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def run(command: list[str], threads: int | None) -> float:
    env = {**os.environ, 'PYTHONPATH': str(CODE_ROOT)}
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f'{" ".join(command[:4])} … failed:\n{done.stderr[-2000:]}')
    return elapsed


def main() -> None:
    parser = bench_parser(__doc__, device_default='cpu')
    parser.add_argument('--config', choices=sorted(GENERATOR_CONFIGS), default='tiny')
    parser.add_argument('--num', type=positive_int, default=64, help='images (default: 64)')
    parser.add_argument('--batch-size', type=positive_int, default=8, help='(default: 8)')
    parser.add_argument('--processes', type=positive_int, default=2, help='torchrun processes (default: 2)')
    parser.add_argument('--amp', action='store_true', help='also time the one-process run with --amp')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        generator = StyleGANGenerator(**GENERATOR_CONFIGS[args.config])
        torch.save({'generator': generator.state_dict()}, tmp / GENFORCE_ZOO_FILE)
        common = ['--weights', str(tmp / GENFORCE_ZOO_FILE), '--num', str(args.num), '--batch-size',
                  str(args.batch_size), '--device', args.device, '--no-progress']
        threads = args.threads or torch.get_num_threads()
        print(f'stage 1, {args.config} generator, {args.num} images, batch {args.batch_size}, device {args.device}'
              + (f', {threads} threads for one process, {max(1, threads // args.processes)} per rank'
                 if args.device == 'cpu' else ''))
        one = run([sys.executable, str(SCRIPT), *common, '--root', str(tmp / 'one')], threads)
        print(f'one process: {one:.1f} s ({args.num / one:.2f} images/s)')
        torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    f'--nproc_per_node={args.processes}', '--', str(SCRIPT)]  # '--': see docs/scale-out-inference.md
        split = run([*torchrun, *common, '--root', str(tmp / 'split')], max(1, threads // args.processes))
        same = files_of(tmp / 'one') == files_of(tmp / 'split')
        print(f'{args.processes} processes: {split:.1f} s ({args.num / split:.2f} images/s), ratio {one / split:.2f}x; '
              f'files {"byte-identical" if same else "DIFFER"} to the one-process run')
        if args.amp:
            amp = run([sys.executable, str(SCRIPT), *common, '--amp', '--root', str(tmp / 'amp')], threads)
            diffs = []
            for n in range(args.num):
                a, b = (cv2.imread(str(Layout(tmp / r).synthesized_image(n))).astype(int) for r in ('one', 'amp'))
                diffs.append(np.abs(a - b))
            d = np.stack(diffs)
            print(f'one process --amp: {amp:.1f} s, ratio {one / amp:.2f}x; JPEG pixels vs float32: max {d.max()}, '
                  f'mean {d.mean():.3f}, 99th percentile {np.percentile(d, 99):.0f}')


if __name__ == '__main__':
    main()
