"""Merging hand labels with ensemble scores, and the filter that builds the fine-tuning image set.

``cnn/all_image_quality_and_gender.csv`` holds one row per image: its hand labels (0.0 / 1.0) where labels
apply, else the ensemble means. An image is kept when gender >= 0.7 and quality >= 0.9 (the defaults); kept
files are hard-linked (copied where links are impossible) into ``stylegan/synthesize_results_filtered/``.
Stage 1 replaces images by rename, never in place, so a link never sees its source change under it.
"""
from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cnn.labels import Labels
from cnn.scoring import final_column
from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.layout import Layout, image_name
from ohlora.records import write_if_changed
from stylegan.sampling import existing_images

MERGED_COLUMNS = ['img_no', 'img_path', 'gender_score', 'quality_score']


def merge_scores(layout: Layout, img_nos: list[int], labels: Labels | None,
                 frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per image that has labels or scores, ascending; images with neither (unreadable) are left out."""
    scored = {prop: final_column(frame, prop) for prop, frame in frames.items()}
    labelled = {}
    if labels is not None:
        labelled = {int(n): (float(g), float(q)) for n, g, q in
                    zip(labels.img_nos, labels.of('gender'), labels.of('quality'))}
    image_dir = layout.relative(layout.synthesized_dir)
    rows = []
    for img_no in sorted(img_nos):
        if img_no in labelled:
            gender, quality = labelled[img_no]
        elif img_no in scored['gender'] and img_no in scored['quality']:
            gender, quality = scored['gender'][img_no], scored['quality'][img_no]
        else:
            continue
        rows.append((img_no, f'{image_dir}/{image_name(img_no)}', gender, quality))
    frame = pd.DataFrame(rows, columns=MERGED_COLUMNS)
    return frame.astype({'img_no': 'int64', 'gender_score': 'float64', 'quality_score': 'float64'})


def write_table_if_changed(path: Path, frame: pd.DataFrame) -> bool:
    """Atomic CSV write, skipped when the file already holds exactly this table (idempotent reruns)."""
    return write_if_changed(path, atomic.csv_text(frame).encode('utf-8'))


def select(merged: pd.DataFrame, gender_min: float, quality_min: float) -> list[int]:
    keep = (merged['gender_score'].to_numpy() >= gender_min) & (merged['quality_score'].to_numpy() >= quality_min)
    return merged['img_no'].to_numpy()[keep].astype(int).tolist()


@dataclass
class FilterResult:
    kept: int
    linked: int
    copied: int
    unchanged: int
    removed: list[int]   # img_nos of an earlier selection that are no longer kept


def place(source: Path, dest: Path) -> str:
    """Hard-link ``source`` at ``dest`` atomically, or copy it where links fail; 'unchanged' if already equal."""
    if dest.is_file() and (os.path.samefile(source, dest) or filecmp.cmp(source, dest, shallow=False)):
        return 'unchanged'
    tmp = atomic.temporary_name(dest)
    try:
        os.link(source, tmp)
        os.replace(tmp, dest)
        return 'linked'
    except OSError:  # another file system, or one without links: a byte copy, still atomic
        if tmp.exists():
            tmp.unlink()
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise PipelineError(f'cannot read {source}: {exc.strerror or exc}') from None
    atomic.write_bytes(dest, data)
    return 'copied'


def sync_filtered(layout: Layout, keep: list[int], progress: bool = True) -> FilterResult:
    """Make the filtered folder hold exactly the kept images (byte-identical), removing earlier selections."""
    folder = layout.filtered_dir
    present = existing_images(folder)  # a folder with foreign files is an error, not something to clean
    folder.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(folder)  # of a run that was killed mid-placement
    counts = {'linked': 0, 'copied': 0, 'unchanged': 0}
    for img_no in tqdm(keep, desc='filtering', unit='img', disable=not progress):
        source = layout.synthesized_image(img_no)
        if not source.is_file():
            raise PipelineError(f'{source} vanished while filtering; rerun run_cnn.py')
        counts[place(source, layout.filtered_image(img_no))] += 1
    stale = sorted(present - set(keep))
    for img_no in stale:
        layout.filtered_image(img_no).unlink()
    return FilterResult(len(keep), counts['linked'], counts['copied'], counts['unchanged'], stale)


def describe_removed(removed: list[int]) -> str:
    shown = ', '.join(image_name(n) for n in removed[:5])
    return shown + (f', … ({len(removed)} in all)' if len(removed) > 5 else '')


def score_summary(merged: pd.DataFrame, gender_min: float, quality_min: float) -> str:
    gender = merged['gender_score'].to_numpy() >= gender_min
    quality = merged['quality_score'].to_numpy() >= quality_min
    return (f'{int(gender.sum())} of {len(merged)} images have gender >= {gender_min}, {int(quality.sum())} have '
            f'quality >= {quality_min}, {int(np.sum(gender & quality))} both')
