"""Benchmark: stage-5 v3 training steps (full-size 256x256 v3 generator, CVAE encoder, property CNN and gender CNN),
float32 against --amp.

One step is what the v3 trainer does per batch: encoder forward, reparameterisation, the generator forward, both
frozen CNNs on the generated images, the four loss terms, the backward pass through the CNNs and the generator into
the mapping network and the encoder, one AdamW step. Both precisions run in this process on the same models (random
weights cost what real ones cost), in turns, best pass kept; the ratio is amp / float32. Peak memory: GPU
allocator peak per precision, or the process's peak resident memory on CPU.

    python bench/bench_cvae_training.py                                       # GPU: batch 8, 10 steps per pass
    python bench/bench_cvae_training.py --device cpu --batch-size 2 --steps 2 --repeat 1   # CPU: about a minute

Upstream's figure to compare with: 588 steps of batch 8 per epoch; the README gives no v3 epoch time.
"""
from __future__ import annotations

import copy

import torch

from cnn.models import GenderCNN
from ohlora.cli import positive_int
from stylegan_modified.cvae_encoder import CVAEEncoder
from stylegan_modified.cvae_training import CVAETrainer, V3Settings
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3
from bench_common import bench_parser, compare_precisions, prepare_device


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--batch-size', type=positive_int, default=8, help='images per step (default: 8, upstream)')
    parser.add_argument('--steps', type=positive_int, default=10, help='timed steps per pass (default: 10)')
    parser.add_argument('--repeat', type=positive_int, default=2, help='passes per precision, best kept (default: 2)')
    args = parser.parse_args()
    device = prepare_device(args)

    torch.manual_seed(0)
    models = (StyleGANGeneratorForV3(resolution=256), CVAEEncoder(), PropertyScoreCNN(), GenderCNN())
    trainers = {amp: CVAETrainer(*copy.deepcopy(models), V3Settings(epochs=1, batch_size=args.batch_size,
                                                                    device=str(device), amp=amp), device)
                for amp in (False, True)}
    images = torch.rand(args.batch_size, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.randn(args.batch_size, 7, generator=torch.Generator().manual_seed(2))
    threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
    sizes = ', '.join(f'{sum(p.numel() for p in m.parameters()) / 1e6:.1f} M' for m in models)
    print(f'v3 step, full-size G, encoder, property CNN, gender CNN ({sizes} parameters), batch {args.batch_size}, '
          f'device {device}{threads}, {args.steps} steps per pass, best of {args.repeat}')

    best = compare_precisions(trainers, lambda trainer: trainer.step(images, labels), args.steps, args.repeat,
                              args.batch_size, device)
    seconds = 4703 / (args.steps * args.batch_size / best[False])
    print(f'an upstream epoch (4,703 images, 588 steps of 8) at the float32 rate: {seconds / 3600:.2f} h '
          '(plus the per-epoch test: 1,530 generator + CNN passes without gradients)')


if __name__ == '__main__':
    main()
