"""Benchmark: one stage-5 v2 property-CNN epoch (training steps + validation), float32 against --amp, in one process.

It runs the trainer of ``stylegan_modified.property_cnn_training`` (AdamW, MSE, the validation metrics) on
``--images`` random 256x256 images held in memory (split 90/10 as the trainer does), so it times the network and
the optimiser, not JPEG decoding. The float32 epoch is the baseline; the --amp epoch (autocast float16 on CUDA,
bfloat16 on CPU, with GradScaler on CUDA) runs after it in the same process on the same data. Prints the
images/s of each and their ratio, and the peak GPU memory on CUDA.

    python bench/bench_property_cnn_training.py                        # CPU default: 20 images, batch 4
    python bench/bench_property_cnn_training.py --images 40 --threads 2
    python bench/bench_property_cnn_training.py --device cuda --images 1024 --batch-size 16
"""
from __future__ import annotations

import time

import torch

from ohlora.cli import positive_int
from stylegan_modified.property_cnn_training import (PropertyCnnSettings, _CnnTrainer, new_property_cnn,
                                                     train_validation_split)
from bench_common import bench_parser, prepare_device, synchronize


def batches(images, labels, indices, batch_size):
    return [{'image': images[indices[k:k + batch_size]], 'label': labels[indices[k:k + batch_size]],
             'index': indices[k:k + batch_size]} for k in range(0, len(indices), batch_size)]


def epoch(amp: bool, images, labels, device, batch_size: int) -> dict:
    """Seconds of the training part and of the validation of one epoch (after one warm-up step)."""
    settings = PropertyCnnSettings(amp=amp, batch_size=batch_size, eval_batch_size=batch_size, device=str(device))
    trainer = _CnnTrainer(new_property_cnn(seed=0), settings, device)
    train_idx, val_idx = train_validation_split(len(images), seed=0)
    train, val = batches(images, labels, train_idx, batch_size), batches(images, labels, val_idx, batch_size)
    trainer.start_epoch()
    trainer.set_lr(0)
    trainer.step(train[0]['image'], train[0]['label'])  # warm-up: oneDNN / cuDNN pick their kernels
    trainer.validate(val[:1])
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for batch in train:
        trainer.step(batch['image'], batch['label'])
    synchronize(device)
    trained = time.perf_counter()
    metrics = trainer.validate(val)[0]
    synchronize(device)
    return {'train_s': trained - started, 'val_s': time.perf_counter() - trained, 'train_n': len(train_idx),
            'val_n': len(val_idx), 'valid_loss': metrics.valid_loss,
            'peak_mb': torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else None}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument('--images', type=positive_int, default=20, help='images of the epoch (default: 20)')
    parser.add_argument('--batch-size', type=positive_int, default=4, help='training and validation batch (default: 4)')
    args = parser.parse_args()
    device = prepare_device(args)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(args.images, 3, 256, 256, generator=generator) * 2 - 1).to(device)
    labels = torch.randn(args.images, 7, generator=generator).to(device)
    print(f'device {device}, threads {torch.get_num_threads()}, {args.images} images, batch {args.batch_size}')
    results = {}
    for name, amp in (('float32', False), ('amp', True)):
        r = results[name] = epoch(amp, images, labels, device, args.batch_size)
        memory = f'   peak {r["peak_mb"]:.0f} MB' if r['peak_mb'] is not None else ''
        print(f'{name:8s} train {r["train_n"] / r["train_s"]:7.2f} img/s   validation {r["val_n"] / r["val_s"]:7.2f} '
              f'img/s   epoch {r["train_s"] + r["val_s"]:6.1f} s   valid_loss {r["valid_loss"]:.4f}{memory}')
    fp32, amp = results['float32'], results['amp']
    whole = (fp32['train_s'] + fp32['val_s']) / (amp['train_s'] + amp['val_s'])
    print(f'amp / float32 speed: train x{fp32["train_s"] / amp["train_s"]:.2f}, validation '
          f'x{fp32["val_s"] / amp["val_s"]:.2f}, epoch x{whole:.2f}')


if __name__ == '__main__':
    main()
