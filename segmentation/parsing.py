"""Stage 3: detect, crop and parse every filtered image; write the class map, its visualisation and the crop.

Per image (``NNNNNN``), in ``segmentation/segmentation_results/`` (PIPELINE.md §5):

* ``face_NNNNNN.png``: the 224x224 crop the parser saw, rebuilt from its input with upstream's truncation;
* ``parsing_visualization_NNNNNN.png``: a 50/50 blend of that crop and the class colours;
* ``parsing_NNNNNN.png``: the 224x224 class map, 8-bit single channel, values 0-10, in the crop frame.

The class map is written last, so its presence means the image is finished: a rerun skips those images and
redoes the rest (R14). Images where MTCNN finds no face, or that cannot be decoded, are listed in
``skipped.csv`` (``img_no,reason``) and the run goes on (R5). Both models are built once; FaceXFormer
runs on batches on the chosen device (R7).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.layout import Layout, parse_img_no
from segmentation.face_detection import FaceBox, FaceDetector
from segmentation.face_input import face_png_pixels, normalize, resized_crop

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
SKIP_COLUMNS = ['img_no', 'reason']
NO_FACE = 'no face detected'

# Visualisation colours (RGB) of the 11 LaPa classes, from upstream ``visualize_mask``.
CLASS_NAMES = ('background', 'skin', 'left_eyebrow', 'right_eyebrow', 'left_eye', 'right_eye', 'nose',
               'upper_lip', 'inner_mouth', 'lower_lip', 'hair')
CLASS_COLOURS = np.array([
    (0, 0, 0), (0, 153, 255), (102, 255, 153), (0, 204, 153), (255, 255, 102), (255, 255, 204),
    (255, 153, 0), (255, 102, 255), (102, 0, 51), (255, 204, 255), (255, 0, 102)], dtype=np.uint8)


@dataclass(frozen=True)
class InputImages:
    """The numbered images of a folder (sorted by number) and the names that are not ours."""
    images: list[tuple[int, Path]]
    ignored: list[str]


@dataclass
class PreparedFace:
    img_no: int
    face: FaceBox
    crop: np.ndarray  # 224×224×3 uint8 RGB, Pillow bicubic


@dataclass
class StageSummary:
    parsed: int = 0
    already_done: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def list_input_images(folder: Path) -> InputImages:
    """``NNNNNN.jpg`` (or .jpeg/.png) files of ``folder`` by number; other names are reported, not read.

    An empty or missing folder, or two files with the same number, is an error.
    """
    if not folder.is_dir():
        raise PipelineError(f'{folder}: no such folder (the filtered images of stage 2; run stage 2 first)')
    images: dict[int, Path] = {}
    ignored = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith('.'):  # hidden files and our own .tmp- files
            continue
        img_no = parse_img_no(path.name)
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or img_no is None \
                or path.stem != f'{img_no:06d}':
            ignored.append(path.name)
            continue
        if img_no in images:
            raise PipelineError(f'{folder} holds two files for image {img_no}: {images[img_no].name} and '
                                f'{path.name}; keep one')
        images[img_no] = path
    if not images:
        hint = f' (it holds {len(ignored)} other files, e.g. {ignored[0]})' if ignored else ''
        raise PipelineError(f'{folder} holds no NNNNNN.jpg images{hint}; run stage 2 first')
    return InputImages(sorted(images.items()), ignored)


def is_finished(layout: Layout, img_no: int) -> bool:
    return all(p.is_file() for p in (layout.face_crop(img_no), layout.parsing_visualization(img_no),
                                     layout.parsing_map(img_no)))


@dataclass(frozen=True)
class WorkPlan:
    """Which input images still need parsing, and which earlier results stand."""
    pending: list[tuple[int, Path]]
    finished: int
    settled_skips: dict[int, str]  # earlier skip entries whose image has not changed since


def plan_work(layout: Layout, inputs: InputImages) -> WorkPlan:
    """Finished images (all three files) and images skipped by an earlier run are not redone.

    A skipped image is retried when its file is newer than ``skipped.csv`` (it was replaced since).
    """
    skip_csv = layout.segmentation_skipped_csv
    earlier = read_skip_list(skip_csv)
    listed_at = skip_csv.stat().st_mtime_ns if earlier else 0
    pending, finished, settled = [], 0, {}
    for img_no, path in inputs.images:
        if is_finished(layout, img_no):
            finished += 1
        elif img_no in earlier and path.stat().st_mtime_ns <= listed_at:
            settled[img_no] = earlier[img_no]
        else:
            pending.append((img_no, path))
    return WorkPlan(pending, finished, settled)


def read_rgb(path: Path) -> Image.Image:
    """The image as RGB (grayscale, palette and RGBA files are converted; alpha is dropped)."""
    with Image.open(path) as image:
        return image.convert('RGB')


def prepare(detector: FaceDetector, img_no: int, path: Path) -> PreparedFace | tuple[int, str]:
    """Detect, grow, crop and resize one image; ``(img_no, reason)`` when it cannot be parsed."""
    try:
        image = read_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's messages quote the full path; the CSV must not hold absolute paths (R4).
        text = str(exc).replace(str(path), path.name).strip()
        return img_no, f'unreadable image: {text.splitlines()[0][:120] if text else type(exc).__name__}'
    with torch.inference_mode():
        face = detector.detect(image)
    if face is None:
        return img_no, NO_FACE
    x1, y1, x2, y2 = face.crop_box
    if x2 <= x1 or y2 <= y1:
        return img_no, f'face box {face.crop_box} is empty after clamping to the image'
    return PreparedFace(img_no, face, resized_crop(image, face.crop_box))


def visualization(face_rgb: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """50/50 ``cv2.addWeighted`` blend of the face crop and the class colours, RGB uint8."""
    return cv2.addWeighted(face_rgb, 0.5, CLASS_COLOURS[class_map], 0.5, 0)


def write_outputs(layout: Layout, img_no: int, face_rgb: np.ndarray, class_map: np.ndarray) -> None:
    """The three files of one image, each atomically; the class map last, as the 'finished' mark."""
    atomic.write_image(layout.face_crop(img_no), np.ascontiguousarray(face_rgb[:, :, ::-1]))
    atomic.write_image(layout.parsing_visualization(img_no),
                       np.ascontiguousarray(visualization(face_rgb, class_map)[:, :, ::-1]))
    atomic.write_image(layout.parsing_map(img_no), class_map.astype(np.uint8))


def parse_faces(model, faces: list[PreparedFace], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(B×224×224 uint8 class maps, B×224×224×3 uint8 face.png pixels) of a batch of crops."""
    inputs = normalize(np.stack([f.crop for f in faces]))
    with torch.inference_mode():
        logits = model.segment(inputs.to(device))
        # argmax of the logits is the upstream softmax-argmax (softmax is monotonic).
        class_maps = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return class_maps, face_png_pixels(inputs)


def read_skip_list(path: Path) -> dict[int, str]:
    """A previous run's skip list; an unreadable one is treated as empty (it is rebuilt)."""
    if not path.is_file():
        return {}
    try:
        frame = pd.read_csv(path, dtype={'reason': str}, keep_default_na=False)
        return {int(n): str(r) for n, r in zip(frame['img_no'], frame['reason'])}
    except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return {}


def write_skip_list(path: Path, skipped: dict[int, str]) -> None:
    rows = sorted(skipped.items())
    atomic.write_csv(path, pd.DataFrame(rows, columns=SKIP_COLUMNS))


def _batches(pending: list[tuple[int, Path]], detector: FaceDetector, batch_size: int,
             skipped: dict[int, str], bar) -> Iterator[list[PreparedFace]]:
    """Batches of ``batch_size`` prepared faces; images that cannot be parsed go to ``skipped``."""
    batch = []
    for img_no, path in pending:
        prepared = prepare(detector, img_no, path)
        if isinstance(prepared, PreparedFace):
            batch.append(prepared)
        else:
            skipped[prepared[0]] = prepared[1]
            bar.update(1)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetched(iterator: Iterator, enabled: bool) -> Iterator:
    """``iterator``, with its next item computed in a thread while the caller works on the current one.

    Used when parsing runs on a GPU: MTCNN and the Pillow crop (CPU) then overlap the FaceXFormer pass.
    """
    if not enabled:
        yield from iterator
        return
    sentinel = object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, iterator, sentinel)
        while (item := future.result()) is not sentinel:
            future = pool.submit(next, iterator, sentinel)
            yield item


def run_stage(layout: Layout, model, detector: FaceDetector, pending: list[tuple[int, Path]],
              batch_size: int, device: torch.device, progress: bool = True,
              present: set[int] | None = None) -> StageSummary:
    """Parse ``pending`` images in batches, write their files, and keep ``skipped.csv`` up to date.

    Skip entries of earlier runs are kept for images this run did not reach (an interrupted run) that are
    still unfinished and, when ``present`` (every input number) is given, still in the input folder.
    """
    summary = StageSummary()
    layout.segmentation_dir.mkdir(parents=True, exist_ok=True)
    earlier = read_skip_list(layout.segmentation_skipped_csv)
    reached: set[int] = set()
    try:
        with tqdm(total=len(pending), unit='img', desc='parsing', disable=not progress) as bar:
            batches = _batches(pending, detector, batch_size, summary.skipped, bar)
            for batch in _prefetched(batches, enabled=device.type != 'cpu'):
                class_maps, face_pixels = parse_faces(model, batch, device)
                for face, class_map, pixels in zip(batch, class_maps, face_pixels):
                    write_outputs(layout, face.img_no, pixels, class_map)
                    reached.add(face.img_no)
                summary.parsed += len(batch)
                bar.update(len(batch))
    finally:
        reached.update(summary.skipped)
        kept = {n: r for n, r in earlier.items() if n not in reached and not is_finished(layout, n)
                and (present is None or n in present)}
        write_skip_list(layout.segmentation_skipped_csv, {**kept, **summary.skipped})
    return summary


def run_record(layout: Layout, summary: StageSummary, *, images_dir: Path, weights: Path, device: torch.device,
               batch_size: int, seed: int) -> dict:
    """What produced the files (the meta JSON beside them): weights file, settings, counts, versions."""
    from importlib import metadata

    import torchvision

    from segmentation.face_detection import MARGIN_PERCENTAGE

    return {
        'images_dir': layout.relative(images_dir),
        'weights_file': weights.name,
        'weights_bytes': weights.stat().st_size,
        'device': str(device),
        'batch_size': batch_size,
        'seed': seed,  # recorded for uniformity: nothing in this stage is random
        'mtcnn': {'package': f'facenet-pytorch {metadata.version("facenet-pytorch")}',
                  'device': 'cpu', 'face': 'largest box', 'margin_percentage': MARGIN_PERCENTAGE},
        'parsed_this_run': summary.parsed,
        'already_done': summary.already_done,
        'skipped': len(summary.skipped),
        'ignored_files': summary.ignored,
        'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__},
    }
