"""Benchmark: GenForce StyleGAN generator throughput, batched calls against per-image calls of the same module.

Everything runs in this process on one eval-mode generator, under ``torch.inference_mode`` with fixed noise,
as stage 1 samples. The baseline generates one image per call (a batch-1 loop, how a naive sampler works);
the same images are then generated in batches of 8 and 32. The batched images are compared with the
per-image ones (equal up to float rounding), and images/s and the ratio to the baseline are printed.

    python bench/bench_generator.py                                # tiny widths, CPU default: < 1 min
    python bench/bench_generator.py --device cuda --config full   # the zoo model's widths (random weights)
    python bench/bench_generator.py --config full --weights stylegan/stylegan_model.pth --images 64

``--config tiny`` is the topology of tests/data/genforce (256x256 output, channels 16..4);
``--config full`` is GenForce's resolution-256 zoo configuration (26 M parameters). Without --weights the
weights are random, which costs the same time as the real ones.
"""
from __future__ import annotations

import time

import torch

from ohlora.cli import positive_int
from stylegan.checkpoint import load_generator
from stylegan.stylegan_generator import StyleGANGenerator
from bench_common import bench_parser, prepare_device, synchronize

CONFIGS = {
    'tiny': dict(resolution=256, z_space_dim=64, w_space_dim=64, mapping_fmaps=64, fmaps_base=1024, fmaps_max=16),
    'full': dict(resolution=256),
}



def generate(generator, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    parts = [generator(z[i:i + batch_size], trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image']
             for i in range(0, len(z), batch_size)]
    return torch.cat(parts)


def timed(generator, z: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    synchronize(z.device)
    start = time.perf_counter()
    images = generate(generator, z, batch_size)
    synchronize(z.device)
    return time.perf_counter() - start, images


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--config', choices=sorted(CONFIGS), default=None,
                        help='generator widths (default: tiny on cpu, full on cuda)')
    parser.add_argument('--weights', default=None, metavar='PTH', help='zoo checkpoint to load instead (its widths)')
    parser.add_argument('--batch-sizes', type=positive_int, nargs='+', default=[1, 8, 32], metavar='B')
    parser.add_argument('--images', type=positive_int, default=None,
                        help='images per timed pass (default: 64 for tiny, 32 on cpu / 256 on cuda for full)')
    parser.add_argument('--repeat', type=positive_int, default=3, help='timed passes per path, best kept (default: 3)')
    args = parser.parse_args()

    device = prepare_device(args)
    config = args.config or ('full' if device.type == 'cuda' else 'tiny')
    if args.weights:
        generator = load_generator(args.weights, device=device)
        config = 'weights'
    else:
        torch.manual_seed(0)
        generator = StyleGANGenerator(**CONFIGS[config]).to(device).eval()
    num_images = args.images or (64 if config == 'tiny' else 256 if device.type == 'cuda' else 32)
    num_images = max(num_images, max(args.batch_sizes))
    z = torch.randn(num_images, generator.z_space_dim, generator=torch.Generator().manual_seed(1)).to(device)

    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    print(f'generator: {config} ({sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M parameters, '
          f'{generator.resolution}x{generator.resolution}), device {device}{threads}, {num_images} images per pass')
    # Batch 1 is the baseline: the same module called once per image. The batch sizes are timed in turns,
    # best of --repeat each, so a load change from other work on the machine hits them alike.
    batch_sizes = sorted({1, *args.batch_sizes})
    best = dict.fromkeys(batch_sizes, float('inf'))
    relative = 0.0
    with torch.inference_mode():
        for batch_size in batch_sizes:  # warm-up: kernels, allocator, oneDNN primitives for each shape
            generate(generator, z[:2 * batch_size], batch_size)
        for _ in range(args.repeat):
            for batch_size in batch_sizes:
                seconds, images = timed(generator, z, batch_size)
                best[batch_size] = min(best[batch_size], seconds)
                if batch_size == 1:
                    reference = images
                else:  # batching changes only float rounding
                    relative = max(relative, ((images - reference).abs().max() / reference.abs().max()).item())
    baseline = num_images / best[1]
    for batch_size in batch_sizes:
        speed = num_images / best[batch_size]
        note = '(baseline: per-image calls)' if batch_size == 1 else f'x{speed / baseline:5.2f} vs per-image calls'
        print(f'batch {batch_size:3d}: {speed:9.2f} img/s  {note}')
    print(f'batched vs per-image images: largest difference {relative:.1e} of the largest |pixel|')


if __name__ == '__main__':
    main()
