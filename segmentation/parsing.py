"""Stage 3: detect, crop and parse every filtered image; write the class map, its visualisation and the crop.

Per image (``NNNNNN``), in ``segmentation/segmentation_results/`` (PIPELINE.md §5):

* ``face_NNNNNN.png``: the 224x224 crop the parser saw, rebuilt from its input with upstream's truncation;
* ``parsing_visualization_NNNNNN.png``: a 50/50 blend of that crop and the class colours;
* ``parsing_NNNNNN.png``: the 224x224 class map, 8-bit single channel, values 0-10, in the crop frame.

The class map is written last. ``segmentation_meta.json`` records the settings (the FaceXFormer weights by
SHA-256, the MTCNN rule) and, per image, the input file (relative to the root) and the SHA-256 of its bytes. A
rerun with the same settings skips an image whose three files exist (or that was skipped) and whose input bytes
are unchanged; a replaced image, or any image after a change of weights, is parsed again (R14). Images where
MTCNN finds no face, that are too small for it, or that cannot be decoded, are listed in ``skipped.csv``
(``img_no,reason``) and the run goes on (R5). Both models are built once; FaceXFormer runs on batches on the
chosen device (R7).

A split run (``--shard i/n`` or torchrun) parses the images at positions k mod n = i of the sorted input list; a
shard keeps its record entries and skip list in its shard record (:class:`ShardStageRecord`) and the merge
(:func:`merge_shard_records`) writes the record and ``skipped.csv`` one process writes. Which faces share a
FaceXFormer batch then differs from one process, so a map can differ at near-tie pixels (as with another
``--batch-size``).
"""
from __future__ import annotations

import io
import re
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
from ohlora.amp import AMP_NAME, autocast
from ohlora.distributed import Shard
from ohlora.errors import PipelineError, first_line
from ohlora.layout import (SEGMENTATION_OUTPUT_PATTERN, Layout, image_name, is_input_image, name_form,
                           parse_img_no)
from ohlora.records import load_record, scan_outputs, sha256_bytes, sha256_of
from ohlora.sharding import ShardRecords
from segmentation.face_detection import FaceBox, FaceDetector
from segmentation.face_input import face_png_pixels, normalize, resized_crop

SKIP_COLUMNS = ['img_no', 'reason']
NO_FACE = 'no face detected'
RECORD_EVERY = 256  # images between two saves of the per-image record (a killed run redoes at most these)

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
    digest: str       # SHA-256 of the image bytes the crop came from


@dataclass(frozen=True)
class Skip:
    img_no: int
    reason: str
    digest: str | None  # of the bytes read, None when the file could not be read at all


@dataclass
class ParsingSummary:
    parsed: int = 0
    already_done: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def list_input_images(folder: Path, empty_reason: str | None = None) -> InputImages:
    """``NNNNNN.jpg`` (or .jpeg/.png) files of ``folder`` by number; other names are reported, not read.

    An empty or missing folder, or two files with the same number, is an error; ``empty_reason`` says why the
    folder is empty when the caller knows (e.g. stage 2 kept no image).
    """
    if not folder.is_dir():
        raise PipelineError(f'{folder}: no such folder (the filtered images of stage 2; run stage 2 first)')
    images: dict[int, Path] = {}
    ignored = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith('.'):  # hidden files and our own .tmp- files
            continue
        if not path.is_file() or not is_input_image(path):
            ignored.append(path.name)
            continue
        img_no = parse_img_no(path.name)
        if img_no in images:
            raise PipelineError(f'{folder} holds two files for image {img_no}: {images[img_no].name} and '
                                f'{path.name}; keep one')
        images[img_no] = path
    if not images:
        hint = f' (it holds {len(ignored)} other files, e.g. {ignored[0]})' if ignored else ''
        raise PipelineError(f'{folder} holds no {name_form(image_name(0))} images{hint}; '
                            f'{empty_reason or "run stage 2 first"}')
    return InputImages(sorted(images.items()), ignored)


def is_finished(layout: Layout, img_no: int) -> bool:
    return all(p.is_file() for p in (layout.face_crop(img_no), layout.parsing_visualization(img_no),
                                     layout.parsing_map(img_no)))


def stage_settings(weights_sha256: str, amp: bool = False) -> dict:
    """What the three files of an image depend on besides the image's bytes (``amp``: FaceXFormer under bfloat16
    autocast; left out when off, so float32 records stay as they were)."""
    from importlib import metadata

    from segmentation.face_detection import MARGIN_PERCENTAGE

    settings = {'weights_sha256': weights_sha256,
                'mtcnn': {'package': f'facenet-pytorch {metadata.version("facenet-pytorch")}', 'device': 'cpu',
                          'face': 'largest box', 'margin_percentage': MARGIN_PERCENTAGE}}
    if amp:
        settings['amp'] = AMP_NAME
    return settings


@dataclass(frozen=True)
class WorkPlan:
    """Which input images still need parsing, and which earlier results stand."""
    pending: list[tuple[int, Path]]
    finished: int
    settled_skips: dict[int, str]            # earlier skip entries whose image has not changed since
    inputs: dict[str, dict]                  # record entries of the results that stand
    changed: int = 0                         # images with results whose bytes have changed since


def read_stage_record(layout: Layout) -> dict | None:
    """The stage-3 record; an unusable one counts as absent (every image is parsed again)."""
    record = load_record(layout.segmentation_meta)
    if record is None or not isinstance(record.get('inputs'), dict):
        return None
    return record


def check_outputs(layout: Layout) -> None:
    """A folder or link under a result's name is a one-line error (a rerun could neither trust nor replace it)."""
    atomic.check_writable(layout.segmentation_dir)
    atomic.check_replaceable(layout.segmentation_skipped_csv, layout.segmentation_meta)
    scan_outputs(layout.segmentation_dir, SEGMENTATION_OUTPUT_PATTERN, 'a stage-3 result file')


def plan_work(layout: Layout, inputs: InputImages, settings: dict, shard_record: dict | None = None) -> WorkPlan:
    """Images whose results (all three files, or a skip entry) were made from the same bytes with the same settings
    are not redone; every other image is pending. ``shard_record``: a shard's own earlier record (same settings),
    whose entries and skips count as well."""
    check_outputs(layout)
    record = read_stage_record(layout)
    recorded = record['inputs'] if record is not None and record.get('settings') == settings else {}
    earlier = read_skip_list(layout.segmentation_skipped_csv)
    if shard_record is not None:
        recorded = {**recorded, **shard_record.get('inputs', {})}
        earlier = {**earlier, **{int(n): str(r) for n, r in shard_record.get('skipped', {}).items()}}
    pending, finished, settled, standing, changed = [], 0, {}, {}, 0
    for img_no, path in inputs.images:
        try:
            digest = sha256_of(path)
        except OSError:
            digest = None  # unreadable: parsing it gives the reason for skipped.csv
        entry = recorded.get(f'{img_no:06d}')
        same = isinstance(entry, dict) and digest is not None and entry.get('sha256') == digest
        if same and is_finished(layout, img_no):
            finished += 1
        elif same and img_no in earlier:
            settled[img_no] = earlier[img_no]
        else:
            changed += isinstance(entry, dict) and not same
            pending.append((img_no, path))
            continue
        standing[f'{img_no:06d}'] = {**entry, 'source': layout.path_from_root(path)}  # where it is now
    return WorkPlan(pending, finished, settled, standing, changed)


def read_rgb(path: Path) -> tuple[Image.Image, str]:
    """The image as RGB (grayscale, palette and RGBA files are converted; alpha is dropped) and the SHA-256 of the
    bytes it was decoded from (the record's key: a result belongs to that content)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return image.convert('RGB'), sha256_bytes(data)


def prepare(detector: FaceDetector, img_no: int, path: Path) -> PreparedFace | Skip:
    """Detect, grow, crop and resize one image; a :class:`Skip` with the reason when it cannot be parsed."""
    try:
        image, digest = read_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's messages quote the full path; the CSV must not hold absolute paths (R4).
        text = str(exc).replace(str(path), path.name).strip()
        # Pillow names the in-memory buffer by its address, which differs between runs: name the file instead.
        text = re.sub(r'<_io\.BytesIO object at 0x[0-9a-fA-F]+>', path.name, text)
        reason = f'unreadable image: {text.splitlines()[0][:120] if text else type(exc).__name__}'
        try:
            digest = sha256_of(path)
        except OSError:
            digest = None
        return Skip(img_no, reason, digest)
    if min(image.size) < detector.min_side:
        return Skip(img_no, f'image of {image.size[0]}x{image.size[1]} pixels is too small for face detection '
                            f'(at least {detector.min_side}x{detector.min_side})', digest)
    try:
        with torch.inference_mode():
            face = detector.detect(image)
    except (RuntimeError, ValueError, IndexError) as exc:  # MTCNN fails inside torch on degenerate images
        return Skip(img_no, f'face detection failed: {first_line(exc, 120)}', digest)
    if face is None:
        return Skip(img_no, NO_FACE, digest)
    x1, y1, x2, y2 = face.crop_box
    if x2 <= x1 or y2 <= y1:
        return Skip(img_no, f'face box {face.crop_box} is empty after clamping to the image', digest)
    return PreparedFace(img_no, face, resized_crop(image, face.crop_box), digest)


def visualization(face_rgb: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    """50/50 ``cv2.addWeighted`` blend of the face crop and the class colours, RGB uint8."""
    return cv2.addWeighted(face_rgb, 0.5, CLASS_COLOURS[class_map], 0.5, 0)


def write_outputs(layout: Layout, img_no: int, face_rgb: np.ndarray, class_map: np.ndarray) -> None:
    """The three files of one image, each atomically; the class map last, as the 'finished' mark."""
    atomic.write_image(layout.face_crop(img_no), np.ascontiguousarray(face_rgb[:, :, ::-1]))
    atomic.write_image(layout.parsing_visualization(img_no),
                       np.ascontiguousarray(visualization(face_rgb, class_map)[:, :, ::-1]))
    atomic.write_image(layout.parsing_map(img_no), class_map.astype(np.uint8))


def parse_faces(model, faces: list[PreparedFace], device: torch.device,
                amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(B×224×224 uint8 class maps, B×224×224×3 uint8 face.png pixels) of a batch of crops; ``amp``: FaceXFormer
    under bfloat16 autocast."""
    inputs = normalize(np.stack([f.crop for f in faces]))
    with torch.inference_mode(), autocast(device, amp):
        logits = model.segment(inputs.to(device)).float()
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
             skipped: list[Skip], bar) -> Iterator[list[PreparedFace]]:
    """Batches of ``batch_size`` prepared faces; images that cannot be parsed go to ``skipped``."""
    batch = []
    for img_no, path in pending:
        prepared = prepare(detector, img_no, path)
        if isinstance(prepared, PreparedFace):
            batch.append(prepared)
        else:
            skipped.append(prepared)
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


class StageRecord:
    """``segmentation_meta.json``: the settings, and per image the input file (relative to the root, so stage 4
    finds it) and the SHA-256 of the bytes its results were made from.

    Saved after whole batches (every ``RECORD_EVERY`` images) and at the end, after the files it vouches for: a
    killed run redoes the images since the last save, in the batches an uninterrupted run would have formed, so
    its files come out byte-identical."""

    def __init__(self, layout: Layout, settings: dict, standing: dict[str, dict], info: dict):
        self.layout, self.settings, self.inputs, self.info = layout, settings, dict(standing), dict(info)
        self.unsaved = 0

    def add(self, img_no: int, path: Path, digest: str | None) -> None:
        if digest is None:
            return  # nothing to compare a rerun with: the image is tried again
        self.inputs[f'{img_no:06d}'] = {'source': self.layout.path_from_root(path), 'sha256': digest}
        self.unsaved += 1

    def save_if_due(self) -> None:
        if self.unsaved >= RECORD_EVERY:
            self.save()

    def save(self, **info) -> None:
        self.info.update(info)
        atomic.write_json(self.layout.segmentation_meta, {'settings': self.settings,
                                                          'inputs': dict(sorted(self.inputs.items())), **self.info})
        self.unsaved = 0

    def read_skips(self) -> dict[int, str]:
        """The skip list of earlier runs (the stage's ``skipped.csv``)."""
        return read_skip_list(self.layout.segmentation_skipped_csv)

    def write_skips(self, skipped: dict[int, str]) -> None:
        write_skip_list(self.layout.segmentation_skipped_csv, skipped)


class ShardStageRecord(StageRecord):
    """A shard's :class:`StageRecord`: its entries, skip list and run info go into its shard record (unfinished
    until :meth:`finish`), never into the stage's own record or ``skipped.csv``."""

    def __init__(self, layout: Layout, settings: dict, standing: dict[str, dict], info: dict, *,
                 records: ShardRecords, shard: Shard, key: dict, earlier_skips: dict[int, str], already_done: int):
        super().__init__(layout, settings, standing, info)
        self.records, self.shard, self.key = records, shard, key
        self.skipped = dict(earlier_skips)
        self.already_done = already_done
        self.ran = False          # whether this shard parsed anything (one process writes its record only then)
        self.new_skips: dict[int, str] = {}

    def save(self, **info) -> None:
        self.info.update(info)
        self.ran = True
        self._write(finished=False)
        self.unsaved = 0

    def read_skips(self) -> dict[int, str]:
        return dict(self.skipped)

    def write_skips(self, skipped: dict[int, str]) -> None:
        self.skipped = dict(skipped)

    def finish(self, new_skips: dict[int, str]) -> None:
        self.new_skips = dict(new_skips)
        self._write(finished=True)

    def _write(self, finished: bool) -> None:
        self.records.write(self.shard, self.key, finished=finished, ran=self.ran, already_done=self.already_done,
                           inputs=dict(sorted(self.inputs.items())),
                           skipped={f'{n:06d}': r for n, r in sorted(self.skipped.items())},
                           new_skips={f'{n:06d}': r for n, r in sorted(self.new_skips.items())}, info=self.info)


def merge_shard_records(layout: Layout, shards: list[dict], settings: dict, inputs: InputImages) -> ParsingSummary | None:
    """The stage record and ``skipped.csv`` of a split run, as one process writes them, from its shards' records
    (nothing is written when no shard had anything to parse, as one process writes nothing then). Every input
    image must have its results or a skip entry."""
    skipped = {int(n): str(r) for record in shards for n, r in record.get('skipped', {}).items()}
    lost = [n for n, _ in inputs.images if not is_finished(layout, n) and n not in skipped]
    if lost:
        raise PipelineError(f'{layout.parsing_map(lost[0])} is missing and no shard skipped image {lost[0]:06d} '
                            f'({len(lost)} images in all); rerun the shards, then merge')
    ran = [record for record in shards if record.get('ran')]
    if not ran:
        return None
    summary = ParsingSummary(parsed=sum(r['info'].get('parsed_this_run', 0) for r in ran),
                             already_done=sum(r.get('already_done', 0) for r in shards),
                             skipped={int(n): str(reason) for r in shards for n, reason in r.get('new_skips', {}).items()})
    info = dict(ran[0]['info'])
    info.update(already_done=summary.already_done, parsed_this_run=summary.parsed,
                skipped_this_run=len(summary.skipped))
    entries = {name: entry for record in shards for name, entry in record.get('inputs', {}).items()}
    write_skip_list(layout.segmentation_skipped_csv, skipped)
    atomic.write_json(layout.segmentation_meta, {'settings': settings, 'inputs': dict(sorted(entries.items())), **info})
    return summary


def run_stage(layout: Layout, model, detector: FaceDetector, pending: list[tuple[int, Path]],
              batch_size: int, device: torch.device, progress: bool = True,
              present: set[int] | None = None, record: StageRecord | None = None, amp: bool = False) -> ParsingSummary:
    """Parse ``pending`` images in batches, write their files, and keep ``skipped.csv`` and the record up to date
    (a shard's :class:`ShardStageRecord` keeps both in its shard record).

    Skip entries of earlier runs are kept for images this run did not reach (an interrupted run) that are
    still unfinished and, when ``present`` (every input number) is given, still in the input folder.
    """
    summary = ParsingSummary()
    layout.segmentation_dir.mkdir(parents=True, exist_ok=True)
    earlier = record.read_skips() if record is not None else read_skip_list(layout.segmentation_skipped_csv)
    paths = dict(pending)
    reached: set[int] = set()
    skips: list[Skip] = []
    if record is not None:
        record.save()  # the new settings, and only the earlier results that stand
    try:
        with tqdm(total=len(pending), unit='img', desc='parsing', disable=not progress) as bar:
            batches = _batches(pending, detector, batch_size, skips, bar)
            for batch in _prefetched(batches, enabled=device.type != 'cpu'):
                class_maps, face_pixels = parse_faces(model, batch, device, amp)
                for face, class_map, pixels in zip(batch, class_maps, face_pixels):
                    write_outputs(layout, face.img_no, pixels, class_map)
                    reached.add(face.img_no)
                if record is not None:  # a whole batch at a time: see StageRecord
                    for face in batch:
                        record.add(face.img_no, paths[face.img_no], face.digest)
                    record.save_if_due()
                summary.parsed += len(batch)
                bar.update(len(batch))
    finally:
        summary.skipped.update({skip.img_no: skip.reason for skip in skips})
        reached.update(summary.skipped)
        kept = {n: r for n, r in earlier.items() if n not in reached and not is_finished(layout, n)
                and (present is None or n in present)}
        if record is not None:
            record.write_skips({**kept, **summary.skipped})
        else:
            write_skip_list(layout.segmentation_skipped_csv, {**kept, **summary.skipped})
        if record is not None:
            for skip in skips:  # after skipped.csv lists them
                record.add(skip.img_no, paths[skip.img_no], skip.digest)
            record.save(parsed_this_run=summary.parsed, skipped_this_run=len(summary.skipped))
    return summary


def run_info(layout: Layout, *, images_dir: Path, weights: Path, device: torch.device, batch_size: int,
             seed: int, already_done: int, ignored: list[str]) -> dict:
    """What else the record says about the run that wrote it (for the reader; it decides nothing)."""
    import torchvision

    return {
        'images_dir': layout.path_from_root(images_dir),
        'weights_file': weights.name,
        'device': str(device),
        'batch_size': batch_size,
        'seed': seed,  # recorded for uniformity: nothing in this stage is random
        'already_done': already_done,
        'ignored_files': ignored,
        'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__},
    }


def stage2_empty_reason(layout: Layout) -> str | None:
    """Why the filtered folder is empty when stage 2 ran and kept no image; None when stage 2 has not run."""
    merged = layout.cnn_merged_csv
    if not merged.is_file():
        return None
    try:
        scored = len(pd.read_csv(merged))
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        scored = 'its'
    return (f'stage 2 ran but kept none of {scored} images (see {merged}); rerun run_cnn.py with a lower '
            '--gender-threshold or --quality-threshold')
