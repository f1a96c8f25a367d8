"""Benchmark: stage-6 generation (conditional generator + JPEG files), batched against a per-image loop.

Both paths run in this process on one eval-mode conditional generator and write the same images into
temporary folders. The baseline is the straightforward loop: one forward pass per image, then encode and
write that JPEG before the next image. The optimised path is the library's ``generate`` (batched forward
passes under ``inference_mode``, JPEG encoding in a thread pool, atomic writes), timed at several batch
sizes. The decoded images of both paths are compared (equal up to float rounding and JPEG).

    python bench/bench_fine_tuned_generator.py                               # tiny widths on CPU: < 1 min
    python bench/bench_fine_tuned_generator.py --config full --images 16     # the published v3 widths (random weights)
    python bench/bench_fine_tuned_generator.py --device cuda --config full --images 256 --batch-sizes 8 32

``--config tiny`` is the topology of tests/data/ohlora/cond_stylegan_tiny.pt (256x256 output, channels
16..4); ``--config full`` is ``StyleGANGeneratorForV3(resolution=256)`` (26 M parameters). Random weights cost
the same time as the real ones; ``--weights`` loads a real v3 file instead.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ohlora.cli import positive_int
from ohlora.layout import GenerationFolder
from stylegan.postprocess import to_uint8
from stylegan_modified.checkpoint import load_conditional_generator
from stylegan_modified.generation import GenerationSettings, generate, varied_latent
from stylegan_modified.labels import UPSTREAM_LABEL, label_vector
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3
from bench_common import bench_parser, prepare_device, synchronize

CONFIGS = {
    'tiny': dict(resolution=256, z_space_dim=32, w_space_dim=32, mapping_fmaps=32, fmaps_base=1024, fmaps_max=16),
    'full': dict(resolution=256),
}



def per_image_loop(generator, folder: Path, base_z, num: int, seed: int, variation: float) -> None:
    """The naive baseline: G on one image, write it, next image."""
    device = next(generator.parameters()).device
    label = torch.from_numpy(label_vector(UPSTREAM_LABEL))[None].to(device)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for n in range(num):
            z = varied_latent(base_z, seed, n, variation)[None].to(device)
            image = generator(z, label, trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image']
            cv2.imwrite(str(GenerationFolder(folder).image(n)), to_uint8(image)[0][:, :, ::-1])


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny', help='generator widths (default: tiny)')
    parser.add_argument('--weights', default=None, metavar='PTH', help='a v3 generator file to load instead')
    parser.add_argument('--images', type=positive_int, default=32, help='images per timed pass (default: 32)')
    parser.add_argument('--batch-sizes', type=positive_int, nargs='+', default=[4, 16], metavar='B')
    parser.add_argument('--repeat', type=positive_int, default=2, help='timed passes per path, best kept (default: 2)')
    args = parser.parse_args()

    device = prepare_device(args)
    if args.weights:
        generator = load_conditional_generator(args.weights, 'v3', device)
        config = 'weights'
    else:
        torch.manual_seed(0)
        generator = StyleGANGeneratorForV3(**CONFIGS[args.config]).to(device).eval()
        config = args.config
    base_z = np.random.default_rng(0).standard_normal(generator.z_space_dim)
    settings = GenerationSettings(model='v3', weights_sha256='bench', z_sha256='bench',
                                  seed=0, variation=0.3, label=dict(UPSTREAM_LABEL))
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    print(f'v3 generator: {config} ({sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M parameters), '
          f'device {device}{threads}, {args.images} images per pass (forward + JPEG files)')

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        per_image_loop(generator, scratch / 'warm', base_z, 2, 0, 0.3)  # warm-up: kernels, allocator
        for batch_size in args.batch_sizes:
            generate(generator, GenerationFolder(scratch / f'warm{batch_size}'), settings, base_z, UPSTREAM_LABEL,
                     min(args.images, 2 * batch_size), batch_size, progress=False)
        best = {}
        for attempt in range(args.repeat):  # paths timed in turns, so a load change hits them alike
            for path in ['loop', *args.batch_sizes]:
                folder = scratch / f'{path}_{attempt}'
                synchronize(device)
                start = time.perf_counter()
                if path == 'loop':
                    per_image_loop(generator, folder, base_z, args.images, 0, 0.3)
                else:
                    generate(generator, GenerationFolder(folder), settings, base_z, UPSTREAM_LABEL, args.images, path,
                             progress=False)
                synchronize(device)
                best[path] = min(best.get(path, float('inf')), time.perf_counter() - start)
        worst = 0
        for n in range(args.images):
            a = cv2.imread(str(GenerationFolder(scratch / 'loop_0').image(n))).astype(int)
            for batch_size in args.batch_sizes:
                b = cv2.imread(str(GenerationFolder(scratch / f'{batch_size}_0').image(n))).astype(int)
                worst = max(worst, int(np.abs(a - b).max()))

    baseline = args.images / best['loop']
    print(f'per-image loop : {baseline:8.2f} img/s  (baseline)')
    for batch_size in args.batch_sizes:
        speed = args.images / best[batch_size]
        print(f'generate, B={batch_size:<3d}: {speed:8.2f} img/s  x{speed / baseline:5.2f} vs the per-image loop')
    print(f'largest decoded pixel difference, batched vs per-image: {worst} (float rounding through JPEG)')


if __name__ == '__main__':
    main()
