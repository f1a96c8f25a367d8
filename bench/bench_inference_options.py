"""Benchmark: the inference options of the sharded stages (--amp, channels-last, torch.compile) against the plain
float32 path, in this process, on the three networks the stages run.

For each network the plain path (float32, contiguous, eager) is timed first; each option then runs on the same
inputs and prints its time ratio to the plain path (> 1: faster) and how far its outputs are from the plain ones,
in the unit of what the stage writes:

* ``generator`` (stages 1 and 6, the directions sampling): GenForce StyleGAN images as uint8 levels
  (max and mean absolute difference, share of values more than 2 levels off);
* ``cnn`` (stage 2): the sigmoid score of a fold model (max and mean absolute difference);
* ``facexformer`` (stage 3): the share of parsing-map pixels whose class differs.

``amp`` is bfloat16 autocast as --amp runs it (for the generator: the synthesis network only), ``amp16``
float16 autocast (for comparison only; no stage offers it), ``channels_last`` the weights and input in
channels-last memory (``amp_channels_last`` both), ``compile`` ``torch.compile`` of the forward (default mode;
its compile time is printed apart and left out of the ratio). Weights are random (GenForce/CNN default init,
FaceXFormer's synthetic rule): they cost the same time as trained ones, but the tolerances of trained weights may
differ. The paths are timed in turns. Nothing is asserted; the figures go into docs/scale-out-inference.md.

    python bench/bench_inference_options.py                                  # CPU: tiny generator, < 2 min
    python bench/bench_inference_options.py --config full --networks generator --images 4
    python bench/bench_inference_options.py --device cuda --config full --images 64 --compile
"""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from ohlora.amp import AMP_DTYPE
from ohlora.cli import positive_int
from stylegan.postprocess import to_uint8
from bench_common import bench_parser, prepare_device, synchronize

GENERATOR_CONFIGS = {
    'tiny': dict(resolution=256, z_space_dim=64, w_space_dim=64, mapping_fmaps=64, fmaps_base=1024, fmaps_max=16),
    'full': dict(resolution=256),
}
NETWORKS = ('generator', 'cnn', 'facexformer')
OPTIONS = ('amp', 'amp16', 'channels_last', 'amp_channels_last', 'compile')


def build(network: str, config: str, images: int, device: torch.device):
    """(module, input batch, forward(module, x) -> raw output, compare(plain, other) -> text)."""
    torch.manual_seed(0)
    if network == 'generator':
        from stylegan.stylegan_generator import StyleGANGenerator

        module = StyleGANGenerator(**GENERATOR_CONFIGS[config]).to(device).eval()
        x = torch.randn(images, module.z_space_dim, generator=torch.Generator().manual_seed(1)).to(device)

        def forward(m, z, dtype=None):
            wp = m.truncation(m.mapping(z)['w'])
            with autocast_to(device, dtype):  # as stage 1 runs --amp: the synthesis network only
                return m.synthesis(wp, randomize_noise=False)['image']

        def compare(a, b):
            d = np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int))
            return f'uint8 max {d.max()}, mean {d.mean():.3f}, >2 levels {100 * (d > 2).mean():.2f} %'
    elif network == 'cnn':
        from cnn.models import MODEL_CLASSES

        module = MODEL_CLASSES['quality']().to(device).eval()
        x = torch.rand(images, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device)

        def forward(m, images01, dtype=None):
            with autocast_to(device, dtype):
                return m(images01).reshape(-1)

        def compare(a, b):
            d = (a.double() - b.double()).abs()
            return f'score max {d.max().item():.2e}, mean {d.mean().item():.2e}'
    else:
        from segmentation.facexformer import facexformer_from_state_dict
        from segmentation.facexformer_synthetic import synthetic_state_dict

        module = facexformer_from_state_dict(synthetic_state_dict()).to(device).eval()
        x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)

        def forward(m, batch, dtype=None):
            with autocast_to(device, dtype):
                return m.segment(batch)

        def compare(a, b):
            differs = (a.argmax(1) != b.argmax(1)).double().mean().item()
            return f'map pixels differing {100 * differs:.3f} %'
    return module, x, forward, compare


def variant(option: str | None, module, x: torch.Tensor, forward, device: torch.device):
    """(prepared module, input, forward) of an option; None: the plain path."""
    if option == 'channels_last':
        import copy

        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return module, x, forward
    if option == 'compile':
        compiled = torch.compile(lambda batch: forward(module, batch))
        return module, x, lambda m, batch: compiled(batch)
    if option == 'amp_channels_last':
        module, x, _ = variant('channels_last', module, x, forward, device)
        return module, x, lambda m, batch: forward(m, batch, AMP_DTYPE).float()
    if option in ('amp', 'amp16'):
        dtype = AMP_DTYPE if option == 'amp' else torch.float16
        return module, x, lambda m, batch: forward(m, batch, dtype).float()
    return module, x, forward


def autocast_to(device: torch.device, dtype):
    """Autocast to ``dtype`` (None: off), as ``ohlora.amp.autocast`` does for bfloat16."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def timed(module, x, forward, batch_size: int, device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    start = time.perf_counter()
    outputs = [forward(module, x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]
    synchronize(device)
    return time.perf_counter() - start, torch.cat(outputs).cpu()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--networks', default=','.join(NETWORKS), help=f'comma-separated, of {",".join(NETWORKS)}')
    parser.add_argument('--options', default=None, help=f'comma-separated, of {",".join(OPTIONS)} (default: amp, '
                        'channels_last, and amp16 on CUDA: CPU float16 kernels are emulated, 100x slower)')
    parser.add_argument('--compile', action='store_true', help='add torch.compile to the options')
    parser.add_argument('--config', choices=sorted(GENERATOR_CONFIGS), default=None,
                        help='generator widths (default: tiny on cpu, full on cuda)')
    parser.add_argument('--images', type=positive_int, default=None,
                        help='inputs per network (default: 4 cpu, 64 cuda)')
    parser.add_argument('--batch-size', type=positive_int, default=None, help='(default: 4 cpu, 16 cuda)')
    parser.add_argument('--repeat', type=positive_int, default=3, help='timed passes per path, best kept (default: 3)')
    args = parser.parse_args()

    device = prepare_device(args)
    logging.getLogger('torch._dynamo').setLevel(logging.ERROR)  # graph-break notes of torch.compile
    cuda = device.type == 'cuda'
    config = args.config or ('full' if cuda else 'tiny')
    images, batch_size = args.images or (64 if cuda else 4), args.batch_size or (16 if cuda else 4)
    default = ['amp', 'channels_last', 'amp_channels_last'] + (['amp16'] if cuda else [])
    options = args.options.split(',') if args.options else default
    options = [o for o in options if o] + (['compile'] if args.compile else [])
    threads = f', {torch.get_num_threads()} threads' if not cuda else f', {torch.cuda.get_device_name(device)}'
    print(f'device {device}{threads}; generator config {config}; {images} inputs, batch {batch_size}')
    with torch.inference_mode():
        for network in args.networks.split(','):
            module, x, forward, compare = build(network, config, images, device)
            paths, warm = {'plain': (module, x, forward)}, {}
            for option in options:
                try:
                    m, xi, fwd = variant(option, module, x, forward, device)
                    start = time.perf_counter()
                    fwd(m, xi[:batch_size])  # warm-up (and the compilation)
                    synchronize(device)
                    warm[option] = time.perf_counter() - start
                    paths[option] = (m, xi, fwd)
                except Exception as exc:  # an option this machine cannot run is a result too
                    print(f'  {option}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})')
            forward(module, x[:batch_size])
            # The paths are timed in turns, best of --repeat each, so a load change from other work on the
            # machine hits them alike.
            best, outputs = dict.fromkeys(paths, float('inf')), {}
            for _ in range(args.repeat):
                for name, (m, xi, fwd) in paths.items():
                    elapsed, outputs[name] = timed(m, xi, fwd, batch_size, device)
                    best[name] = min(best[name], elapsed)
            plain = best['plain']
            print(f'{network}: plain float32 {plain:.3f} s ({images / plain:.2f} inputs/s)')
            for name in paths:
                if name != 'plain':
                    extra = f', first call {warm[name]:.1f} s' if name == 'compile' else ''
                    print(f'  {name}: {best[name]:.3f} s, ratio {plain / best[name]:.2f}x{extra}; '
                          f'{compare(outputs["plain"], outputs[name])}')
            del module, paths

if __name__ == '__main__':
    main()
