"""Benchmark: the v2 property CNN and the v3 CVAE encoder, NCHW against channels-last; batched attribute metrics.

The nets run with random weights (the same cost as the published ones) in eval mode, inference only and, for the
property CNN, also forward + backward to the input image (how v3 trains a generator through the frozen CNN).
The baseline is the plain NCHW model; the candidate has channels-last weights (``cnn.ensemble.channels_last``)
and converts the same NCHW batch to channels-last first (the conversion is timed). Outputs are compared; images/s and ratios printed.
The metrics part compares one vectorised ``compare`` call over Z z's with a loop of ``np.corrcoef`` per z.

    python bench/bench_property_cnn.py                          # CPU default: batch 8, < 1 min
    python bench/bench_property_cnn.py --batch-size 16 --threads 2
    python bench/bench_property_cnn.py --device cuda --batch-size 64
"""
from __future__ import annotations

import time

import numpy as np
import torch

from cnn.ensemble import channels_last
from ohlora.cli import positive_int
from stylegan_modified.attribute_metrics import compare, grid_labels
from stylegan_modified.cvae_encoder import CVAEEncoder
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from bench_common import bench_parser, prepare_device, synchronize


def timed(step, device, repeats: int) -> float:
    step()  # warm-up: oneDNN / cuDNN pick their kernels on the first call
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def twin(model: torch.nn.Module) -> torch.nn.Module:
    other = type(model)().to(next(model.parameters()).device).eval()
    other.load_state_dict(model.state_dict())
    return channels_last([other])[0]


def compare_nets(name, baseline, candidate, run, device, batch, repeats) -> None:
    """``run(model, last)`` runs one batch; ``last``: convert the input to channels-last first."""
    plain = timed(lambda: run(baseline, False), device, repeats)
    fast = timed(lambda: run(candidate, True), device, repeats)
    difference = max(float((a - b).abs().max()) for a, b in zip(run(baseline, False), run(candidate, True)))
    print(f'{name:32s} NCHW {batch / plain:8.1f} img/s   channels-last {batch / fast:8.1f} img/s   '
          f'ratio {plain / fast:5.2f}x   max |diff| {difference:.1e}')


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--batch-size', type=positive_int, default=8, help='images per batch (default: 8)')
    parser.add_argument('--repeats', type=positive_int, default=3, help='timed batches per path (default: 3)')
    parser.add_argument('--z', type=positive_int, default=3000, help='z count of the metrics part (default: 3000)')
    args = parser.parse_args()
    device = prepare_device(args)
    torch.manual_seed(0)
    images = (torch.rand(args.batch_size, 3, 256, 256, device=device) * 2 - 1)
    labels = torch.randn(args.batch_size, 7, device=device)
    prop = PropertyScoreCNN().to(device).eval()
    encoder = CVAEEncoder().to(device).eval()
    for module in (prop, encoder):
        module.requires_grad_(False)

    def layout(x, last):
        return x.contiguous(memory_format=torch.channels_last) if last else x

    def infer(model, last):
        with torch.inference_mode():
            return [model(layout(images, last))]

    def through(model, last):  # gradient to the input, the frozen-CNN case of v3
        x = images.clone().requires_grad_(True)
        model(layout(x, last)).square().sum().backward()
        return [x.grad]

    def encode(model, last):
        with torch.inference_mode():
            return list(model(layout(images, last), labels))

    print(f'device {device}, batch {args.batch_size}, threads {torch.get_num_threads()}')
    compare_nets('property CNN, inference', prop, twin(prop), infer, device, args.batch_size, args.repeats)
    compare_nets('property CNN, backward to input', prop, twin(prop), through, device, args.batch_size, args.repeats)
    compare_nets('CVAE encoder, inference', encoder, twin(encoder), encode, device, args.batch_size, args.repeats)

    rng = np.random.default_rng(0)
    intended = grid_labels().astype(np.float64)
    measured = intended + rng.normal(0, 0.5, (args.z, *intended.shape))
    columns = [0, 3, 4]
    loop = timed(lambda: [[np.corrcoef(intended[:, c], m[:, c])[0, 1] for c in columns] for m in measured],
                 torch.device('cpu'), 1)
    vectorised = timed(lambda: compare(intended, measured), torch.device('cpu'), 1)
    expected = np.array([[np.corrcoef(intended[:, c], m[:, c])[0, 1] for c in columns] for m in measured])
    difference = float(np.abs(compare(intended, measured).r - expected).max())
    print(f'{"Pearson r of " + str(args.z) + " z x 3":32s} loop {loop * 1e3:8.1f} ms   vectorised '
          f'{vectorised * 1e3:8.1f} ms (r, MAE, MSE)   ratio {loop / vectorised:5.1f}x   max |diff| {difference:.1e}')


if __name__ == '__main__':
    main()
