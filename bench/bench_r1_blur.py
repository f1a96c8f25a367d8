"""Benchmark: v1's R1 penalty through the full-size D, its blur as a plain depthwise conv against its own autograd
function (stylegan/genforce_layers.py, the current code).

R1 differentiates D's input gradient, so its backward runs PyTorch's generic double backward of D's depthwise
blur convolutions; on an H200 that was 91 % of a v1 step (one fp32 cuDNN kernel). The blur now has its own
autograd function whose backward is the same blur, itself differentiable. Both variants run in this process on
the same D (random weights, 256x256) and the same batch, in turns, best pass kept; the ratio is conv / function.
One pass = the R1 penalty (D forward, input gradient with create_graph) and its backward into D's parameters,
what the D step of a v1 step adds for R1.

    python bench/bench_r1_blur.py                                     # GPU: batch 16
    python bench/bench_r1_blur.py --device cpu --batch-size 2 --steps 1 --repeat 3 --threads 2
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench_common import bench_parser, prepare_device, synchronize
from ohlora.cli import positive_int
from stylegan import genforce_layers
from stylegan_modified.fine_tuning import r1_penalty
from stylegan_modified.stylegan_discriminator import StyleGANDiscriminator


def plain_blur(self, x: torch.Tensor) -> torch.Tensor:
    """The blur as it was: a depthwise conv that autograd differentiates twice by its generic rules."""
    return F.conv2d(x, self.kernel, stride=1, padding=1, groups=x.shape[1])


def r1_pass(discriminator, reals, labels, steps: int) -> tuple[float, list[torch.Tensor]]:
    device = reals.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        discriminator.zero_grad(set_to_none=True)
        x = reals.detach().requires_grad_(True)
        r1_penalty(discriminator(x, labels), x, 10.0).backward()
    synchronize(device)
    return time.perf_counter() - start, [p.grad for p in discriminator.parameters() if p.grad is not None]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--batch-size', type=positive_int, default=16, help='images per pass (default: 16)')
    parser.add_argument('--steps', type=positive_int, default=5, help='R1 penalties per timed pass (default: 5)')
    parser.add_argument('--repeat', type=positive_int, default=2, help='passes per variant, best kept (default: 2)')
    args = parser.parse_args()
    device = prepare_device(args)
    torch.manual_seed(0)
    discriminator = StyleGANDiscriminator(resolution=256).to(device)
    reals = (torch.rand(args.batch_size, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    labels = torch.randn(args.batch_size, 7, generator=torch.Generator().manual_seed(2)).to(device)
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    print(f'R1 penalty + backward of the full-size D (23.1 M parameters), batch {args.batch_size}, device '
          f'{device}{threads}, {args.steps} per pass, best of {args.repeat}')

    function = genforce_layers.BlurLayer.forward
    variants = {'depthwise conv (before)': plain_blur, 'autograd function (now)': function}
    best, grads = {}, {}
    try:
        for name, forward in variants.items():  # warm-up: kernels, allocator
            genforce_layers.BlurLayer.forward = forward
            r1_pass(discriminator, reals, labels, 1)
        for _ in range(args.repeat):
            for name, forward in variants.items():
                genforce_layers.BlurLayer.forward = forward
                seconds, grads[name] = r1_pass(discriminator, reals, labels, args.steps)
                best[name] = min(best.get(name, float('inf')), seconds)
    finally:
        genforce_layers.BlurLayer.forward = function
    for name, seconds in best.items():
        print(f'{name:26s}: {seconds / args.steps:8.3f} s per R1 penalty + backward')
    before, now = (grads[name] for name in variants)
    difference = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(before, now))
    print(f'conv / function: x{best["depthwise conv (before)"] / best["autograd function (now)"]:.2f}; largest '
          f'relative difference of D\'s gradients {difference:.1e}')


if __name__ == '__main__':
    main()
