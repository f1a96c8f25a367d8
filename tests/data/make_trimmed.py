"""Re-create tests/data from the full reference folder (``shared/reference`` of the project's hand-over).

    python tests/data/make_trimmed.py /path/to/shared/reference [--out tests/data]

Files the tests need whole are copied byte for byte; PNG images are re-encoded losslessly (same mode, same
pixels, checked); the three large tensor files keep only what the tests compare. README.md (beside this
script) says what each file holds. The output loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LIMIT = 5 * 2 ** 20  # no tracked file may exceed 5 MiB

COPIED = [
    'genforce/tiny_ckpt.pth', 'genforce/tiny_config.json', 'genforce/keys_stylegan256.json',
    'facexformer/keys_facexformer.json', 'facexformer/ref_meta.json',
    'ohlora/cnn_forward.pt', 'ohlora/cnn_forward_summary.json',
    'ohlora/cond_stylegan_tiny.pt', 'ohlora/cond_stylegan_tiny_summary.json',
    'ohlora/data/MANIFEST.json',
    'ohlora/data/cnn/synthesize_results_quality_and_gender.csv',
    'ohlora/data/segmentation/property_score_results/all_scores.csv',
    'ohlora/data/segmentation/property_score_results/all_scores_v2.csv',
    'ohlora/data/segmentation/property_score_results/all_scores_v2_cnn.csv',
    'ohlora/data/stylegan_modified/test_z_vector_0005.csv',
    'ohlora/data/stylegan_modified/test_z_vector_0007.csv',
    'ohlora/property_scores/scores_alg1_raw.csv', 'ohlora/property_scores/scores_alg1_norm.csv',
    'ohlora/property_scores/scores_alg2_raw.csv', 'ohlora/property_scores/scores_alg2_norm.csv',
    'ohlora/property_scores/scores_detail.json',
]
COPIED_FOLDERS = {'ohlora/keys': '*.json', 'ohlora/property_scores/fixtures': '*.jpg'}  # JPEGs: bytes decide pixels
REENCODED = ['facexformer/astronaut.png', 'facexformer/face_astronaut.png', 'facexformer/drawn_face_A.png']
REENCODED_FOLDERS = {'ohlora/property_scores/fixtures': '*.png'}

# Strides of the spatially sub-sampled tensors: coprime with 2 (the x2 up-convolutions of G and FaceXFormer's
# decoder) and, at 56x56, with 7 (the Swin window), so every sub-pixel phase and window position is sampled.
IMAGE_STRIDE = 5
INTERMEDIATE_STRIDES = {'stage1': 5, 'stage2': 3, 'stage3': 3, 'stage4': 1, 'fused_states': 5}
NEAR_TIE = 1e-4  # FaceXFormer logits whose top-2 gap is at most this may flip the argmax (facexformer README)


def sub(tensor: torch.Tensor, step: int) -> torch.Tensor:
    return tensor[..., ::step, ::step].contiguous()


def trim_genforce(ref: dict) -> dict:
    """GenForce tiny_ref.pt: every code tensor whole; images as first samples or every IMAGE_STRIDE-th pixel."""
    out = {k: v for k, v in ref.items() if not k.startswith(('image_', 'uint8_', 'generator_uint8'))}
    out['image_a_sub5'] = sub(ref['image_a'], IMAGE_STRIDE)  # samples 0-3
    out['image_b_sub5'] = sub(ref['image_b'], IMAGE_STRIDE)  # samples 0-1
    out['uint8_a'] = ref['uint8_a'][:1].clone()
    out['uint8_b'] = ref['uint8_b'][:1].clone()
    out['image_a_lod1p5_sub2'] = ref['image_a_lod1p5_sub2'][:1].clone()
    out['image_a_lod3p5_sub8'] = ref['image_a_lod3p5_sub8']
    out['image_a_lod5p5_sub32'] = ref['image_a_lod5p5_sub32']
    out['generator_uint8_a0'] = ref['generator_uint8_a0']
    return out


def input_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def trim_facexformer_outputs(ref: dict) -> dict:
    """FaceXFormer ref_outputs.pt: the model input as a hash, logits sub-sampled, the parsing as uint8."""
    dropped = {'input', 'seg_logits', 'parsing', 'face_png_rgb', 'drawn_face_labels'}
    out = {k: v for k, v in ref.items() if k not in dropped}
    out['input_sha256'] = input_sha256(ref['input'])
    out['input_shape'] = list(ref['input'].shape)
    out['seg_logits_sub5'] = sub(ref['seg_logits'], IMAGE_STRIDE)
    assert torch.equal(ref['parsing'], ref['seg_logits'].argmax(1)) and int(ref['parsing'].max()) < 256
    out['parsing'] = ref['parsing'].to(torch.uint8)
    top2 = ref['seg_logits'].topk(2, dim=1).values
    out['parsing_near_ties'] = ((top2[:, 0] - top2[:, 1]) <= NEAR_TIE).nonzero()  # [N, 3]: sample, row, col
    out['face_png_rgb'] = ref['face_png_rgb'][:1].clone()  # sample 1 is face_astronaut.png
    return out


def trim_facexformer_intermediates(inter: dict) -> dict:
    out = {'meta': inter['meta']}
    for name, step in INTERMEDIATE_STRIDES.items():
        out[name if step == 1 else f'{name}_sub{step}'] = sub(inter[name], step)
    return out


def reencode_png(source: Path, target: Path) -> None:
    with Image.open(source) as image:
        image.load()
        extra = {'icc_profile': image.info['icc_profile']} if 'icc_profile' in image.info else {}
        image.save(target, optimize=True, compress_level=9, **extra)
        with Image.open(target) as again:
            if again.mode != image.mode or not np.array_equal(np.asarray(again), np.asarray(image)):
                raise SystemExit(f'{target}: re-encoding changed the pixels')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('reference', type=Path, help='the full reference folder (genforce/, facexformer/, ohlora/)')
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent, help='default: tests/data')
    args = parser.parse_args(argv)
    src, dst = args.reference, args.out

    def target(rel: str) -> Path:
        path = dst / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    copied = list(COPIED) + [p.relative_to(src).as_posix() for folder, pattern in COPIED_FOLDERS.items()
                             for p in sorted((src / folder).glob(pattern))]
    for rel in copied:
        shutil.copyfile(src / rel, target(rel))
    reencoded = list(REENCODED) + [p.relative_to(src).as_posix() for folder, pattern in REENCODED_FOLDERS.items()
                                   for p in sorted((src / folder).glob(pattern))]
    for rel in reencoded:
        reencode_png(src / rel, target(rel))

    def load(rel):
        return torch.load(src / rel, map_location='cpu', weights_only=True)

    torch.save(trim_genforce(load('genforce/tiny_ref.pt')), target('genforce/tiny_ref.pt'))
    torch.save(trim_facexformer_outputs(load('facexformer/ref_outputs.pt')), target('facexformer/ref_outputs.pt'))
    torch.save(trim_facexformer_intermediates(load('facexformer/ref_intermediates.pt')),
               target('facexformer/ref_intermediates.pt'))

    too_big = [p for p in dst.rglob('*') if p.is_file() and p.stat().st_size > LIMIT]
    total = sum(p.stat().st_size for p in dst.rglob('*') if p.is_file())
    print(f'{dst}: {len(copied)} copied, {len(reencoded)} PNGs re-encoded, 3 tensor files trimmed; '
          f'{total / 2 ** 20:.1f} MiB in all')
    if too_big:
        sys.exit(f'over 5 MiB: {", ".join(map(str, too_big))}')


if __name__ == '__main__':
    main()
