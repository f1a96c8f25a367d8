"""Benchmark: stage 3 (MTCNN + FaceXFormer parsing), models built once and batched, against upstream's loop.

The baseline does per image what upstream ``inference.test`` did: build ``FaceXFormer()`` (Swin-B initialised,
without upstream's ImageNet download), ``torch.load`` the whole checkpoint, load it strictly, build MTCNN,
detect and crop, then parse a batch of 1 with autograd on. The optimised path is the stage itself:
``load_facexformer`` and ``FaceDetector`` once, then ``run_stage`` on batches. Both write the same three
files per image and their class maps are compared. The images are drawn cartoon faces (256x256 JPEGs,
which MTCNN detects); the checkpoint is the synthetic one of the official layout (written to a temporary
folder, 369 MB) unless --weights names the real file: the weights do not change the cost.

    python bench/bench_segmentation.py                          # CPU default: 3 images, batch 3, < 1 min
    python bench/bench_segmentation.py --images 16 --batch-size 8 --threads 2
    python bench/bench_segmentation.py --device cuda --images 256 --batch-size 64 --weights segmentation_model.pt
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ohlora import atomic
from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.cli import positive_int
from ohlora.layout import Layout
from segmentation.face_detection import FaceDetector
from segmentation.face_input import face_png_pixels, normalize, resized_crop
from segmentation.facexformer import WHAT, FaceXFormer, checkpoint_state_dict, load_facexformer
from segmentation.facexformer_synthetic import write_synthetic_checkpoint
from segmentation.parsing import list_input_images, read_rgb, run_stage, write_outputs

from bench_common import bench_parser, prepare_device, synchronize



def draw_face(seed: int, size: int = 256) -> np.ndarray:
    """A cartoon face (hair, skin, brows, eyes, nose, lips) on a plain background, BGR; MTCNN finds it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = rng.integers(60, 200, 3)
    cx, cy = size // 2 + int(rng.integers(-12, 13)), size // 2 + int(rng.integers(-8, 9))
    fw, fh = int(rng.integers(62, 75)), int(rng.integers(80, 92))
    hair = tuple(int(v) for v in rng.integers(10, 90, 3))
    skin = (int(rng.integers(150, 200)), int(rng.integers(170, 215)), int(rng.integers(200, 240)))
    cv2.ellipse(image, (cx, cy - 12), (fw + 14, fh + 10), 0, 180, 360, hair, -1)
    cv2.ellipse(image, (cx, cy), (fw, fh), 0, 0, 360, skin, -1)
    for side in (-1, 1):
        ex, ey = cx + side * fw * 4 // 10, cy - fh // 5
        cv2.ellipse(image, (ex, ey - 16), (16, 4), 0, 0, 360, (40, 40, 60), -1)
        cv2.ellipse(image, (ex, ey), (13, 7), 0, 0, 360, (255, 255, 255), -1)
        cv2.circle(image, (ex, ey), 5, (60, 40, 20), -1)
    cv2.ellipse(image, (cx, cy + fh // 8), (7, 16), 0, 0, 360, tuple(int(v * 0.85) for v in skin), -1)
    cv2.ellipse(image, (cx, cy + fh // 2), (24, 8), 0, 0, 360, (90, 80, 190), -1)
    cv2.line(image, (cx - 22, cy + fh // 2), (cx + 22, cy + fh // 2), (50, 40, 120), 2)
    return image


def per_image(layout: Layout, images, weights: Path, device: torch.device) -> None:
    """Upstream's loop: everything rebuilt and reloaded for every image, batch 1, autograd on."""
    for img_no, path in images:
        model = FaceXFormer()
        state = checkpoint_state_dict(read_checkpoint(weights, WHAT, map_location=device), weights)
        load_strict(model, state, weights, 'FaceXFormer model')
        model = model.to(device).eval()
        detector = FaceDetector()
        image, _ = read_rgb(path)
        face = detector.detect(image)
        if face is None:
            continue
        inputs = normalize(resized_crop(image, face.crop_box))
        logits = model.segment(inputs.to(device))
        class_map = logits.softmax(dim=1).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        write_outputs(layout, img_no, face_png_pixels(inputs)[0], class_map)
        del model, state
    synchronize(device)


def main(argv=None):
    parser = bench_parser(__doc__, device_default='cpu', threads_default=1)
    parser.add_argument('--images', type=positive_int, default=3, help='images to parse (default: 3)')
    parser.add_argument('--batch-size', type=positive_int, default=3, help='batch of the stage path (default: 3)')
    parser.add_argument('--weights', default=None, help='FaceXFormer checkpoint (default: synthetic, temporary)')
    args = parser.parse_args(argv)
    device = prepare_device(args)

    with tempfile.TemporaryDirectory(prefix='bench-segmentation-') as tmp:
        tmp = Path(tmp)
        if args.weights:
            weights = Path(args.weights)
        else:
            weights = write_synthetic_checkpoint(Layout(tmp / 'weights').facexformer_weights)
        staged, baseline = Layout(tmp / 'stage'), Layout(tmp / 'baseline')
        for img_no in range(args.images):
            atomic.write_image(staged.filtered_image(img_no), draw_face(img_no))
        images = list_input_images(staged.filtered_dir).images

        start = time.perf_counter()
        model = load_facexformer(weights, device)
        summary = run_stage(staged, model, FaceDetector(), images, args.batch_size, device, progress=False)
        synchronize(device)
        stage_s = time.perf_counter() - start
        del model

        start = time.perf_counter()
        per_image(baseline, images, weights, device)
        baseline_s = time.perf_counter() - start

        differing = sum(int((cv2.imread(str(staged.parsing_map(n)), cv2.IMREAD_UNCHANGED)
                             != cv2.imread(str(baseline.parsing_map(n)), cv2.IMREAD_UNCHANGED)).sum())
                        for n, _ in images if staged.parsing_map(n).is_file())
        same_faces = all(staged.face_crop(n).read_bytes() == baseline.face_crop(n).read_bytes()
                         for n, _ in images if staged.face_crop(n).is_file())

    n = len(images)
    print(f'device {device}, {torch.get_num_threads()} threads, {n} images '
          f'({summary.parsed} parsed, {len(summary.skipped)} without a face), batch {args.batch_size}, '
          f'weights {"synthetic" if not args.weights else Path(args.weights).name}')
    print(f'per-image rebuild (upstream loop): {baseline_s:8.2f} s  {n / baseline_s:7.3f} images/s')
    print(f'stage (load once, batched)       : {stage_s:8.2f} s  {n / stage_s:7.3f} images/s')
    print(f'speed-up: {baseline_s / stage_s:.2f}x; face crops identical: {same_faces}; '
          f'class-map pixels differing: {differing} of {n * 224 * 224} (float rounding at near-ties)')


if __name__ == '__main__':
    main()
