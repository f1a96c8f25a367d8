"""Benchmark: the attribute-control evaluation (render, JPEG round trip, property CNN, identity), batched vs per image.

Both paths run in this process through the library's ``evaluate`` on the same eval-mode models, into fresh
temporary folders: the baseline with ``batch_size=1`` (one generator call, one property-CNN call, one identity
call per image), the optimised path at the given batch sizes (one call per batch for each model, JPEG coding
in a thread pool). Every pass writes the same files as a real run (images, score files, sweep grids, tables,
plots). The per-attribute mean r of each path is compared (equal up to float rounding).

    python bench/bench_evaluation.py                                 # tiny generator widths on CPU, ~1 min
    python bench/bench_evaluation.py --config full --z 2             # the published v3 widths (random weights)
    python bench/bench_evaluation.py --device cuda --config full --z 8 --batch-sizes 16 50

``--config tiny`` is the topology of shared/reference/ohlora/cond_stylegan_tiny.pt (256x256 output); ``full`` is
``StyleGANGeneratorForV3()`` (26 M parameters). The property CNN and the identity net are always full size,
with random weights (same cost as the real ones). ``--no-identity`` times generation + property CNN alone.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ohlora.cli import positive_int
from ohlora.layout import AttributeControlFolder
from stylegan_modified.attribute_measurers import PropertyCNNMeasurer
from stylegan_modified.controllable import ConditionalControl
from stylegan_modified.evaluation_inputs import seeded_z
from stylegan_modified.evaluation_run import EvaluationInputs, evaluate
from stylegan_modified.face_identity import FaceEmbedder, new_inception_resnet
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3
from bench_common import bench_parser, prepare_device, synchronize

CONFIGS = {
    'tiny': dict(resolution=256, z_space_dim=32, w_space_dim=32, mapping_fmaps=32, fmaps_base=1024, fmaps_max=16),
    'full': dict(resolution=256),
}
GRID = {'eyes': (-1.8, 1.8), 'mouth': (-1.2, 0.0, 1.6), 'pose': (-1.2, 1.2)}  # 12 labels per z


def timed(inputs: EvaluationInputs, batch_size: int, device, repeat: int) -> tuple[float, dict]:
    best, summary = float('inf'), None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as scratch:
            synchronize(device)
            start = time.perf_counter()
            result = evaluate(inputs, AttributeControlFolder(Path(scratch) / 'run'), batch_size, progress=False)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
            summary = result.summary
    return best, summary


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny', help='generator widths (default: tiny)')
    parser.add_argument('--z', type=positive_int, default=2, help='z vectors (x 12 labels) per pass (default: 2)')
    parser.add_argument('--batch-sizes', type=positive_int, nargs='+', default=[4, 12], metavar='B')
    parser.add_argument('--repeat', type=positive_int, default=1, help='timed passes per path, best kept (default: 1)')
    parser.add_argument('--no-identity', action='store_true', help='leave the identity embedding out')
    args = parser.parse_args()

    device = prepare_device(args)
    torch.manual_seed(0)
    generator = ConditionalControl(StyleGANGeneratorForV3(**CONFIGS[args.config]).to(device), 'v3')
    measurer = PropertyCNNMeasurer(PropertyScoreCNN().to(device), None)
    embedder = None if args.no_identity else FaceEmbedder(new_inception_resnet().to(device))
    inputs = EvaluationInputs(generator, measurer, seeded_z(0, args.z, generator.z_dim), GRID, z_source='seed 0',
                              embedder=embedder)
    images = args.z * int(np.prod([len(v) for v in GRID.values()]))
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    parts = 'generator + JPEG + property CNN' + ('' if embedder is None else ' + identity')
    print(f'{args.config} v3 generator, {parts}, device {device}{threads}: {images} images per pass')

    with tempfile.TemporaryDirectory() as scratch:  # lazy initialisations stay out of the timings
        evaluate(inputs, AttributeControlFolder(Path(scratch) / 'warm-up'), 2, progress=False)
    baseline, reference = timed(inputs, 1, device, args.repeat)
    print(f'per image (batch 1): {images / baseline:6.2f} images/s')
    for batch_size in args.batch_sizes:
        seconds, summary = timed(inputs, batch_size, device, args.repeat)
        drift = max(abs(summary['attributes'][a]['r']['mean'] - reference['attributes'][a]['r']['mean'])
                    for a in GRID)
        print(f'batch {batch_size:3d}:           {images / seconds:6.2f} images/s  ({baseline / seconds:.2f}x; '
              f'mean r differs by {drift:.1e})')


if __name__ == '__main__':
    main()
