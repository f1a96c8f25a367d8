"""Benchmark: stage-5 v1 training steps of the full-size 256x256 conditional G and D, float32 against --amp.

One step is what the v1 trainer does per batch: a D step (G forward for the fakes, D on reals with the R1
double backward, D on fakes) and ``--g-steps`` G steps (default 1, so both precisions do the same work; the
trainer repeats G steps while g_loss >= 2 * d_loss, upstream's log averages 1.0 G steps in epoch 0 and 3.3 by
epoch 38). Both precisions run in this process on the same models (random weights cost what real ones cost),
in turns, best pass kept; the ratio is amp / float32. Peak memory: GPU allocator peak per precision, or the
process's peak resident memory on CPU.

    python bench/bench_fine_tuning.py                                   # GPU: batch 16, 10 steps per pass
    python bench/bench_fine_tuning.py --device cpu --batch-size 2 --steps 2 --repeat 1   # CPU: minutes

Upstream's figure to compare with: 39 epochs of 4,703 images in 16 h on 2 x Quadro M6000, 3.2 img/s.
"""
from __future__ import annotations

import torch

from ohlora.cli import positive_int
from stylegan_modified.fine_tuning import FineTuningSettings, Hyperparameters, V1Trainer
from stylegan_modified.stylegan_discriminator import StyleGANDiscriminator
from stylegan_modified.stylegan_generator import StyleGANGenerator
from bench_common import bench_parser, compare_precisions, prepare_device

UPSTREAM_IMAGES_PER_S = 4703 * 39 / (16 * 3600)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--batch-size', type=positive_int, default=16, help='images per step (default: 16)')
    parser.add_argument('--steps', type=positive_int, default=10, help='timed steps per pass (default: 10)')
    parser.add_argument('--repeat', type=positive_int, default=2, help='passes per precision, best kept (default: 2)')
    parser.add_argument('--g-steps', type=positive_int, default=1, help='G steps per D step (default: 1)')
    args = parser.parse_args()
    device = prepare_device(args)

    torch.manual_seed(0)
    base_g, base_d = StyleGANGenerator(resolution=256), StyleGANDiscriminator(resolution=256)
    hyper = Hyperparameters(max_g_steps=args.g_steps, g_loss_ratio=0.0)  # g_loss < 0 never: exactly --g-steps
    trainers = {}
    for amp in (False, True):
        generator, discriminator = StyleGANGenerator(resolution=256), StyleGANDiscriminator(resolution=256)
        generator.load_state_dict(base_g.state_dict())
        discriminator.load_state_dict(base_d.state_dict())
        settings = FineTuningSettings(epochs=1, batch_size=args.batch_size, device=str(device), amp=amp, hyper=hyper)
        trainers[amp] = V1Trainer(generator, discriminator, settings, device)
    reals = torch.rand(args.batch_size, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.randn(args.batch_size, 7, generator=torch.Generator().manual_seed(2))
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    print(f'v1 step (D step + {args.g_steps} G step), full-size G and D (26.1 M + 23.1 M parameters), batch '
          f'{args.batch_size}, device {device}{threads}, {args.steps} steps per pass, best of {args.repeat}')

    compare_precisions(trainers, lambda trainer: trainer.step(reals, labels), args.steps, args.repeat, args.batch_size,
                       device)
    print(f'upstream (2 x Quadro M6000, average G steps > 1): {UPSTREAM_IMAGES_PER_S:.2f} img/s')


if __name__ == '__main__':
    main()
