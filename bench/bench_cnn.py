"""Benchmark: stage-2 ensemble scoring, the batched streaming path against per-image scoring.

Both paths score the same drawn 256x256 JPEGs with the same eval-mode fold models (random weights, which cost
the same time as the published ones) of both properties. The baseline works as upstream's loop does with
batch 1: per image ``read_image`` -> ``ToPILImage`` -> ``ToTensor``, then each model in turn. The optimised
path is the library's ``score_images``: a DataLoader decodes batches (optionally in worker processes),
each batch goes to all models once, CSVs are written as in a real run. Scores are compared (equal up to float
rounding); images/s and the ratio are printed.

    python bench/bench_cnn.py                                   # CPU default: 8 images, 2+2 models, batch 2, < 1 min
    python bench/bench_cnn.py --models 5 --images 32 --batch-size 16 --workers 2
    python bench/bench_cnn.py --device cuda --models 5 --images 512 --batch-size 64 --workers 8
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from cnn.ensemble import channels_last, ensemble_outputs, final_scores
from cnn.images import decode_rgb
from cnn.models import MODEL_CLASSES
from cnn.scoring import score_images
from ohlora import atomic
from ohlora.cli import positive_int
from ohlora.layout import Layout
from bench_common import bench_parser, prepare_device, synchronize


def draw_images(layout: Layout, count: int) -> None:
    """Smooth random colour fields with a little noise, JPEG-encoded like stage 1 writes them."""
    rng = np.random.default_rng(0)
    for img_no in range(count):
        coarse = rng.uniform(0, 255, (8, 8, 3))
        field = np.kron(coarse, np.ones((32, 32, 1))) + rng.normal(0, 8, (256, 256, 3))
        atomic.write_image(layout.synthesized_image(img_no), np.clip(field, 0, 255).astype(np.uint8))


def per_image(layout: Layout, ensembles, count: int, device: torch.device) -> dict[str, np.ndarray]:
    to_pil, to_tensor = transforms.ToPILImage(), transforms.ToTensor()
    finals = {prop: [] for prop in ensembles}
    with torch.inference_mode():
        for img_no in range(count):
            image = to_tensor(to_pil(decode_rgb(layout.synthesized_image(img_no))))[None].to(device)
            for prop, models in ensembles.items():
                outputs = np.array([[float(model(image)) for model in models]], np.float32)
                finals[prop].append(final_scores(outputs)[0])
    return {prop: np.array(values) for prop, values in finals.items()}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--images', type=positive_int, default=8, help='images scored per path (default: 8)')
    parser.add_argument('--models', type=positive_int, default=2, help='fold models per property (default: 2; runs use 5)')
    parser.add_argument('--batch-size', type=positive_int, default=None,
                        help='batched path batch size (default: 2 on CPU, where the large activations of the gender '
                             'CNN make bigger batches memory-bound; 64 on GPU)')
    parser.add_argument('--workers', type=int, default=0, help='decoding processes of the batched path (default: 0)')
    args = parser.parse_args()

    device = prepare_device(args)
    if args.batch_size is None:
        args.batch_size = 64 if device.type == 'cuda' else 2
    torch.manual_seed(0)
    ensembles = {prop: [MODEL_CLASSES[prop]().to(device).eval() for _ in range(args.models)]
                 for prop in ('quality', 'gender')}
    # the batched path runs the same weights as run_cnn.py holds them (load_ensemble: channels-last)
    fast = {prop: channels_last(copy.deepcopy(models)) for prop, models in ensembles.items()}
    with tempfile.TemporaryDirectory() as folder:
        layout = Layout(Path(folder))
        draw_images(layout, args.images)
        with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
            probe = torch.rand(2, 3, 256, 256, device=device)
            for models in (*ensembles.values(), *fast.values()):
                ensemble_outputs(models, probe)

        synchronize(device)
        start = time.perf_counter()
        baseline = per_image(layout, ensembles, args.images, device)
        synchronize(device)
        baseline_s = time.perf_counter() - start

        start = time.perf_counter()
        result = score_images(layout, fast, list(range(args.images)), {'bench': True}, device=device,
                              batch_size=args.batch_size, workers=args.workers, progress=False)
        synchronize(device)
        batched_s = time.perf_counter() - start

    worst = max(np.abs(result.frames[p][f'property_{p}_final_score'].to_numpy() - baseline[p]).max() for p in baseline)
    base_rate, fast_rate = args.images / baseline_s, args.images / batched_s
    print(f'device {device}, {args.images} images, {args.models} models per property, '
          f'{torch.get_num_threads()} CPU threads')
    print(f'per-image (upstream-style, batch 1): {base_rate:8.2f} images/s  ({baseline_s:.2f} s)')
    print(f'batched (batch {args.batch_size}, {args.workers} workers):   {fast_rate:8.2f} images/s  ({batched_s:.2f} s)')
    print(f'ratio batched / per-image: {fast_rate / base_rate:.2f}x; largest final-score difference {worst:.1e}')


if __name__ == '__main__':
    main()
