"""Benchmark: attribute-direction sampling (batched G + property CNN against a per-image loop) and fit time (svm vs ridge).

Sampling runs the library's own chunk computation (seeded z -> w -> image -> 7 scores) over the same images twice
in one process: once in batches of --batch-size, once one image at a time (the upstream way, batch 1), and prints
images/s, the ratio and the largest difference of the recorded w and scores. Weights are random (the same cost as
the published ones): the property CNN at full size always (its crops need 256 px), the generator tiny
(--generator tiny, fmaps_max 16, z/w 64) or full size (--generator full, the GenForce 256 px shapes).
The fit part draws n synthetic samples (w of width --w-dim, scores linear in w plus noise) and times
``fit_directions`` for eyes/mouth/pose with --method ridge and --method svm (top/bottom 20 %) at the same n.
The score-format part times the property CNN on one batch fed the raw float images against the sampler's
scorer, which feeds it the delivered pixels (uint8 + JPEG round trip, as the evaluation measures).

    python bench/bench_directions.py                                   # CPU default: 16 images, n 20,000, < 2 min
    python bench/bench_directions.py --generator full --num 32 --threads 2
    python bench/bench_directions.py --device cuda --generator full --num 512 --batch-size 64 --fit-num 80000
"""
from __future__ import annotations

import time

import torch

from ohlora.cli import positive_int
from stylegan.stylegan_generator import StyleGANGenerator
from stylegan_modified.direction_fitting import FitOptions, fit_directions
from stylegan_modified.delivered_images import delivered
from stylegan_modified.direction_sampling import PropertyCNNScorer, compute_chunk
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.w_space import StyleGANW
from bench_common import bench_parser, prepare_device, synchronize

GENERATORS = {'tiny': dict(resolution=256, z_space_dim=64, w_space_dim=64, mapping_fmaps=64, fmaps_base=1024,
                           fmaps_max=16),
              'full': dict(resolution=256)}


def timed(step, device):
    synchronize(device)
    started = time.perf_counter()
    result = step()
    synchronize(device)
    return time.perf_counter() - started, result


def bench_sampling(args, device) -> None:
    torch.manual_seed(0)
    generator = StyleGANGenerator(**GENERATORS[args.generator]).to(device).eval()
    w_generator = StyleGANW(generator)
    scorer = PropertyCNNScorer(PropertyScoreCNN().to(device).eval())
    compute_chunk(w_generator, scorer, 0, 10 ** 6, min(2, args.batch_size), args.batch_size)  # warm-up
    batched_s, (w_a, s_a) = timed(lambda: compute_chunk(w_generator, scorer, 0, 0, args.num, args.batch_size), device)
    single_s, (w_b, s_b) = timed(lambda: compute_chunk(w_generator, scorer, 0, 0, args.num, 1), device)
    difference = max(float((w_a - w_b).abs().max()), float((s_a - s_b).abs().max()))
    print(f'sampling ({args.generator} G + property CNN, {args.num} images, {device}): '
          f'batch {args.batch_size} {args.num / batched_s:7.2f} img/s   per image {args.num / single_s:7.2f} img/s   '
          f'ratio {single_s / batched_s:5.2f}x   max |diff| w/scores {difference:.1e}')


def bench_score_format(args, device) -> None:
    """What scoring the delivered pixels (uint8 + JPEG round trip, as the evaluation measures) costs over feeding
    the raw float images to the CNN, on the same batch of random-weight generator images."""
    torch.manual_seed(0)
    generator = StyleGANW(StyleGANGenerator(**GENERATORS[args.generator]).to(device).eval())
    cnn = PropertyScoreCNN().to(device).eval()
    with torch.inference_mode():
        w = generator.w(torch.randn(args.batch_size, generator.z_dim, device=device))
        images = generator.images(w.unsqueeze(1).expand(-1, generator.num_layers, -1).contiguous())
        scorer = PropertyCNNScorer(cnn)
        scorer(images), cnn(images)  # warm-up
        raw_s, raw = timed(lambda: cnn(images), device)
        delivered_s, scored = timed(lambda: scorer(images), device)
        conversion_s, _ = timed(lambda: delivered(images), device)
    print(f'scoring {args.batch_size} images ({device}): raw {raw_s * 1e3:8.1f} ms   delivered (uint8 + JPEG) '
          f'{delivered_s * 1e3:8.1f} ms   ratio {delivered_s / raw_s:5.2f}x   conversion alone '
          f'{conversion_s * 1e3:6.1f} ms   max |score change| {float((scored - raw).abs().max()):.3f}')


def bench_fit(args) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(7, args.w_dim, generator=gen) / args.w_dim ** 0.5
    w = torch.randn(args.fit_num, args.w_dim, generator=gen)
    scores = w @ weights.T + 0.3 * torch.randn(args.fit_num, 7, generator=gen)
    fit_directions(w[:200], scores[:200], FitOptions())  # imports scikit-learn outside the timing
    times = {}
    for method in ('ridge', 'svm'):
        started = time.perf_counter()
        directions = fit_directions(w, scores, FitOptions(method=method))
        times[method] = time.perf_counter() - started
        cosine = torch.nn.functional.cosine_similarity(directions.normals[0], weights[[0, 3, 4]].double(), dim=1)
        print(f'fit {method:5s} n {args.fit_num} x w {args.w_dim}: {times[method]:7.2f} s   '
              f'min cosine to the true directions {float(cosine.min()):.4f}')
    print(f'fit time svm / ridge: {times["svm"] / times["ridge"]:.1f}x')


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--generator', choices=sorted(GENERATORS), default='tiny',
                        help='generator shapes (default: tiny; the property CNN is always full size)')
    parser.add_argument('--num', type=positive_int, default=16, help='images per sampling path (default: 16)')
    parser.add_argument('--batch-size', type=positive_int, default=8, help='images per batch (default: 8)')
    parser.add_argument('--fit-num', type=positive_int, default=20_000, help='samples for the fits (default: 20000)')
    parser.add_argument('--w-dim', type=positive_int, default=512, help='w width for the fits (default: 512)')
    parser.add_argument('--skip-sampling', action='store_true', help='time the fits only')
    args = parser.parse_args()
    device = prepare_device(args)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    if not args.skip_sampling:
        bench_sampling(args, device)
        bench_score_format(args, device)
    bench_fit(args)


if __name__ == '__main__':
    main()
