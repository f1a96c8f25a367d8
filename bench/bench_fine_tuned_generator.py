"""Benchmark: stage-6 generation (conditional generator + JPEG files), batched against a per-image loop.

Both paths run in this process on one eval-mode conditional generator and write the same images into
temporary folders. The baseline is the straightforward loop: one forward pass per image, then encode and
write that JPEG before the next image. The optimised path is the library's ``generate_images`` (batched forward
passes under ``inference_mode``, JPEG encoding and atomic writes in threads while the next batch renders), timed
at several batch sizes, and once more at the largest with the writes of each batch waited for before the next
batch renders (``no overlap``: what stage 6 did before ohlora.image_writer). The decoded images of both paths are
compared (equal up to float rounding and JPEG). Last, one
``--sweep`` run (``--sweep-z`` z's x the values -2..2 of eyes) reports its time and the peak memory that Python
and numpy allocated during it (tracemalloc: the images and grid cells a run keeps; torch's own buffers are not
counted).

    python bench/bench_fine_tuned_generator.py                               # tiny widths on CPU: < 1 min
    python bench/bench_fine_tuned_generator.py --config full --images 16     # the published v3 widths (random weights)
    python bench/bench_fine_tuned_generator.py --device cuda --config full --images 256 --batch-sizes 8 32

``--config tiny`` is the topology of tests/data/ohlora/cond_stylegan_tiny.pt (256x256 output, channels
16..4); ``--config full`` is ``StyleGANGeneratorForV3(resolution=256)`` (26 M parameters). Random weights cost
the same time as the real ones; ``--weights`` loads a real v3 file instead.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import torch

from ohlora.cli import positive_int
from ohlora.image_writer import BatchImageWriter
from ohlora.layout import GenerationFolder
from stylegan.postprocess import to_uint8
from stylegan_modified.checkpoint import load_conditional_generator
from stylegan_modified.controllable import ConditionalControl
from stylegan_modified.generation import GenerationSettings, generate_images, varied_latent
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


@contextlib.contextmanager
def writes_waited_per_batch():
    """The writer without overlap: every batch's files are written before the next batch renders."""
    submit = BatchImageWriter.submit

    def submit_and_wait(self, images):
        submit(self, images)
        while self._in_flight:
            self._finish(self._in_flight.popleft())

    BatchImageWriter.submit = submit_and_wait
    try:
        yield
    finally:
        BatchImageWriter.submit = submit


def sweep_run(controllable, folder: Path, base_z, num: int, batch_size: int) -> tuple[float, int]:
    """(seconds, peak traced bytes) of one eyes sweep over -2..2 with ``num`` z's."""
    values = [-2.0, -1.0, 0.0, 1.0, 2.0]
    settings = GenerationSettings(model='v3', weights_sha256='bench', z_sha256='bench', seed=0, variation=0.3,
                                  label={**UPSTREAM_LABEL, 'eyes': None}, sweep='eyes')
    tracemalloc.start()
    start = time.perf_counter()
    generate_images(controllable, GenerationFolder(folder, 'eyes'), settings, base_z, UPSTREAM_LABEL, num, batch_size,
                    values, progress=False)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny', help='generator widths (default: tiny)')
    parser.add_argument('--weights', default=None, metavar='PTH', help='a v3 generator file to load instead')
    parser.add_argument('--images', type=positive_int, default=32, help='images per timed pass (default: 32)')
    parser.add_argument('--batch-sizes', type=positive_int, nargs='+', default=[4, 16], metavar='B')
    parser.add_argument('--repeat', type=positive_int, default=2, help='timed passes per path, best kept (default: 2)')
    parser.add_argument('--sweep-z', type=int, default=40, help="z's of the sweep run, 0: none (default: 40)")
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
    controllable = ConditionalControl(generator, 'v3')  # what stage 6 hands generate_images
    settings = GenerationSettings(model='v3', weights_sha256='bench', z_sha256='bench',
                                  seed=0, variation=0.3, label=dict(UPSTREAM_LABEL))
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    print(f'v3 generator: {config} ({sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M parameters), '
          f'device {device}{threads}, {args.images} images per pass (forward + JPEG files)')

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        per_image_loop(generator, scratch / 'warm', base_z, 2, 0, 0.3)  # warm-up: kernels, allocator
        for batch_size in args.batch_sizes:
            generate_images(controllable, GenerationFolder(scratch / f'warm{batch_size}'), settings, base_z,
                            UPSTREAM_LABEL, min(args.images, 2 * batch_size), batch_size, progress=False)
        best = {}
        for attempt in range(args.repeat):  # paths timed in turns, so a load change hits them alike
            for path in ['loop', *args.batch_sizes, 'no overlap']:
                folder = scratch / f'{path}_{attempt}'
                synchronize(device)
                start = time.perf_counter()
                if path == 'loop':
                    per_image_loop(generator, folder, base_z, args.images, 0, 0.3)
                else:
                    batch_size = args.batch_sizes[-1] if path == 'no overlap' else path
                    with writes_waited_per_batch() if path == 'no overlap' else contextlib.nullcontext():
                        generate_images(controllable, GenerationFolder(folder), settings, base_z, UPSTREAM_LABEL,
                                        args.images, batch_size, progress=False)
                synchronize(device)
                best[path] = min(best.get(path, float('inf')), time.perf_counter() - start)
        worst = 0
        for n in range(args.images):
            a = cv2.imread(str(GenerationFolder(scratch / 'loop_0').image(n))).astype(int)
            for batch_size in args.batch_sizes:
                b = cv2.imread(str(GenerationFolder(scratch / f'{batch_size}_0').image(n))).astype(int)
                worst = max(worst, int(np.abs(a - b).max()))
        if args.sweep_z:
            sweep_s, sweep_peak = sweep_run(controllable, scratch / 'sweep', base_z, args.sweep_z,
                                            args.batch_sizes[-1])

    baseline = args.images / best['loop']
    print(f'per-image loop : {baseline:8.2f} img/s  (baseline)')
    for batch_size in args.batch_sizes:
        speed = args.images / best[batch_size]
        print(f'generate, B={batch_size:<3d}: {speed:8.2f} img/s  x{speed / baseline:5.2f} vs the per-image loop')
    waited = args.images / best['no overlap']
    print(f'generate, B={args.batch_sizes[-1]:<3d}, writes waited per batch (no overlap): {waited:8.2f} img/s; '
          f'overlapped writes x{args.images / best[args.batch_sizes[-1]] / waited:5.2f}')
    print(f'largest decoded pixel difference, batched vs per-image: {worst} (float rounding through JPEG)')
    if args.sweep_z:
        cells = args.sweep_z * 5
        print(f'sweep, {args.sweep_z} z x 5 values, B={args.batch_sizes[-1]}: {cells / sweep_s:8.2f} img/s, '
              f'peak traced memory {sweep_peak / 2 ** 20:7.1f} MiB (a {generator.resolution}px cell: '
              f'{generator.resolution ** 2 * 3 / 2 ** 20:.2f} MiB decoded)')


if __name__ == '__main__':
    main()
