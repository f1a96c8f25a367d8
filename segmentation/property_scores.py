"""Stage 4: the seven property scores of every parsed image, normalised, with raw scores and statistics saved.

Inputs are the stage-3 files (``parsing_NNNNNN.png`` and, for algorithm 2, ``face_NNNNNN.png``; algorithm 1
reads its colours from the filtered original ``NNNNNN.jpg``). Outputs, in ``segmentation/property_score_results/``:

* ``all_scores[_v2]_raw.csv``: ``img_no`` and the seven raw scores (full precision);
* ``all_scores[_v2].csv``: ``img_no``, a relative ``img_path`` and the z-scores rounded to 4 decimals;
* ``all_scores[_v2]_stats.json``: per column mean, std (ddof = 1), n and the normalised range, plus the guard hits.

The stats file is written last and marks a finished run. A rerun reuses the raw scores of images whose input
files are not newer than the raw CSV, scores the rest, and renormalises (R14).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.layout import SCORE_COLUMNS, Layout, image_name, parse_img_no
from segmentation import property_scores_alg1 as alg1
from segmentation import property_scores_alg2 as alg2
from segmentation.property_scores_common import ImageScores, check_colour, read_bgr, read_parsing_map
from segmentation.score_normalization import (
    ColumnStats, normalise, normalise_with_stats, read_raw_scores, read_stats, stats_document, write_stats)

ALGORITHMS = (1, 2)
GUARDS = {1: alg1.GUARDS, 2: alg2.GUARDS}
FROM_THESE_SCORES = 'these scores'
# Below this many images per worker a process pool costs more than it saves.
MIN_IMAGES_PER_WORKER = 32


def input_files(layout: Layout, algorithm: int, img_no: int) -> tuple[Path, Path]:
    """(parsing map, colour source) of one image: the face crop (algorithm 2) or the filtered original (1)."""
    colour = layout.filtered_image(img_no) if algorithm == 1 else layout.face_crop(img_no)
    return layout.parsing_map(img_no), colour


def score_image(layout: Layout, algorithm: int, img_no: int) -> ImageScores:
    """Read one image's stage-3 files and compute its seven raw scores with the chosen algorithm."""
    map_path, colour_path = input_files(layout, algorithm, img_no)
    parsing_map = read_parsing_map(map_path)
    if algorithm == 1:
        return alg1.compute_scores(img_no, parsing_map, alg1.read_colour(colour_path))
    face = check_colour(read_bgr(colour_path, 'face crop'), colour_path, 'face crop')
    return alg2.compute_scores(img_no, parsing_map, face)


def _score_chunk(task: tuple[str, int, list[int]]) -> list[ImageScores]:
    root, algorithm, img_nos = task
    layout = Layout(root)
    return [score_image(layout, algorithm, n) for n in img_nos]


def score_images(layout: Layout, algorithm: int, img_nos: list[int], *, workers: int = 1, chunk_size: int = 64,
                 progress: bool = True) -> list[ImageScores]:
    """Scores of ``img_nos`` in their order; chunks of images go to a process pool when ``workers`` > 1."""
    chunks = [img_nos[i:i + chunk_size] for i in range(0, len(img_nos), chunk_size)]
    tasks = [(str(layout.root), algorithm, chunk) for chunk in chunks]
    workers = max(1, min(workers, len(img_nos) // MIN_IMAGES_PER_WORKER, len(chunks)))
    results: list[ImageScores] = []
    with tqdm(total=len(img_nos), desc=f'property scores (algorithm {algorithm})', unit='img',
              disable=not progress or not img_nos, mininterval=1.0) as bar:
        if workers == 1:
            for task in tasks:
                results.extend(_score_chunk(task))
                bar.update(len(task[2]))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for chunk_result in pool.map(_score_chunk, tasks):
                    results.extend(chunk_result)
                    bar.update(len(chunk_result))
    return results


def parsed_images(layout: Layout) -> list[int]:
    """Sorted image numbers that stage 3 left a parsing map for (``parsing_NNNNNN.png``)."""
    folder = layout.segmentation_dir
    if not folder.is_dir():
        raise PipelineError(f'{folder}: no such folder (the stage-3 parsing results; run stage 3 first)')
    found = []
    for path in folder.glob('parsing_*.png'):
        img_no = parse_img_no(path.name)
        if img_no is not None and layout.parsing_map(img_no).name == path.name:
            found.append(img_no)
    if not found:
        raise PipelineError(f'{folder} holds no parsing_NNNNNN.png maps (run stage 3 first)')
    return sorted(found)


def unparsed_filtered_images(layout: Layout, parsed: list[int]) -> list[int]:
    """Filtered images with neither a parsing map nor an entry in stage 3's skip list (stage 3 unfinished?)."""
    if not layout.filtered_dir.is_dir():
        return []
    filtered = {parse_img_no(p.name) for p in layout.filtered_dir.glob('*.jpg')}
    filtered.discard(None)
    skipped: set[int] = set()
    if layout.segmentation_skipped_csv.is_file():
        try:
            skipped = set(pd.read_csv(layout.segmentation_skipped_csv)['img_no'].astype(int))
        except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            pass
    return sorted(filtered - set(parsed) - skipped)


def check_inputs(layout: Layout, algorithm: int, img_nos: list[int]) -> None:
    """Fail before any work when an image lacks its colour source."""
    what = 'filtered original image (algorithm 1 reads its colours)' if algorithm == 1 else 'face crop'
    for img_no in img_nos:
        colour = input_files(layout, algorithm, img_no)[1]
        if not colour.is_file():
            raise PipelineError(f'{colour}: no such file (the {what} of parsed image {img_no:06d})')


@dataclass
class StageSummary:
    algorithm: int
    images: int
    scored: int
    reused: int
    guard_hits: dict[str, list[int]]
    statistics_from: str
    written: list[Path] = field(default_factory=list)
    up_to_date: bool = False
    unparsed: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        hits = ', '.join(f'{name} {len(nos)}' for name, nos in self.guard_hits.items())
        out = [f'algorithm {self.algorithm}: {self.images} images ({self.scored} scored, {self.reused} reused); '
               f'statistics from {self.statistics_from}',
               f'guard hits (image kept, guard value used): {hits}']
        for name, nos in self.guard_hits.items():
            if nos:
                shown = ', '.join(f'{n:06d}' for n in nos[:10]) + (' …' if len(nos) > 10 else '')
                out.append(f'  {name}: {shown}')
        if self.unparsed:
            out.append(f'warning: {len(self.unparsed)} filtered images have no parsing map and are not in '
                       f'skipped.csv (first {self.unparsed[0]:06d}); is stage 3 finished?')
        out.append('up to date, nothing written' if self.up_to_date
                   else 'wrote ' + ', '.join(str(p) for p in self.written))
        return out


def previous_run(layout: Layout, algorithm: int) -> tuple[pd.DataFrame, dict, float] | None:
    """(raw scores, stats document, raw CSV mtime) of a finished earlier run, or None."""
    raw_path, stats_path = layout.property_scores_raw_csv(algorithm), layout.property_scores_stats(algorithm)
    if not (raw_path.is_file() and stats_path.is_file()):
        return None
    try:
        raw = read_raw_scores(raw_path)
        document = json.loads(stats_path.read_text(encoding='utf-8'))
        guarded = document['guarded_images']
        if not isinstance(guarded, dict) or document.get('raw_sha256') != sha256_of(raw_path.read_bytes()):
            return None  # the stats file belongs to another raw CSV (e.g. a run stopped between the writes)
    except (PipelineError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None  # unusable: everything is scored again
    return raw, document, raw_path.stat().st_mtime


def reusable_scores(layout: Layout, algorithm: int, img_nos: list[int], previous) -> dict[int, ImageScores]:
    """Earlier raw scores of images whose input files are not newer than the raw CSV that holds them."""
    if previous is None:
        return {}
    raw, document, written_at = previous
    guards_of: dict[int, list[str]] = {}
    for name, nos in document['guarded_images'].items():
        for n in nos:
            guards_of.setdefault(int(n), []).append(name)
    wanted = set(img_nos)
    values = raw.loc[:, list(SCORE_COLUMNS)].to_numpy(dtype=np.float64)
    reused = {}
    for img_no, row in zip(raw['img_no'].tolist(), values):
        if img_no not in wanted:
            continue
        try:
            newest = max(p.stat().st_mtime for p in input_files(layout, algorithm, img_no))
        except FileNotFoundError:
            continue
        if newest <= written_at:
            reused[img_no] = ImageScores(img_no, tuple(float(v) for v in row), tuple(guards_of.get(img_no, ())))
    return reused


def raw_frame(scores: list[ImageScores]) -> pd.DataFrame:
    frame = pd.DataFrame([s.values for s in scores], columns=list(SCORE_COLUMNS), dtype=np.float64)
    frame.insert(0, 'img_no', np.array([s.img_no for s in scores], dtype=np.int64))
    return frame


def run(layout: Layout, algorithm: int, *, stats_file: str | Path | None = None, workers: int = 1,
        chunk_size: int = 64, force: bool = False, progress: bool = True) -> StageSummary:
    """Score every parsed image, normalise (with ``stats_file`` if given) and write the three outputs."""
    if algorithm not in ALGORITHMS:
        raise PipelineError(f'unknown property-score algorithm {algorithm}; choose 1 or 2')
    img_nos = parsed_images(layout)
    saved_stats: dict[str, ColumnStats] | None = read_stats(stats_file) if stats_file is not None else None
    statistics_from = FROM_THESE_SCORES if saved_stats is None else f'file {Path(stats_file).name}'

    previous = None if force else previous_run(layout, algorithm)
    reused = reusable_scores(layout, algorithm, img_nos, previous)
    to_score = [n for n in img_nos if n not in reused]
    summary = StageSummary(algorithm, len(img_nos), len(to_score), len(reused), {}, statistics_from,
                           unparsed=unparsed_filtered_images(layout, img_nos))

    if (not to_score and previous is not None and saved_stats is None
            and sorted(previous[0]['img_no'].tolist()) == img_nos
            and previous[1].get('statistics_from') == FROM_THESE_SCORES
            and layout.property_scores_csv(algorithm).is_file()):
        summary.guard_hits = {name: sorted(int(n) for n in previous[1]['guarded_images'].get(name, []))
                              for name in GUARDS[algorithm]}
        summary.up_to_date = True
        return summary

    check_inputs(layout, algorithm, to_score)
    fresh = score_images(layout, algorithm, to_score, workers=workers, chunk_size=chunk_size, progress=progress)
    by_img = {**reused, **{s.img_no: s for s in fresh}}
    scores = [by_img[n] for n in img_nos]
    summary.guard_hits = {name: [s.img_no for s in scores if name in s.guards] for name in GUARDS[algorithm]}

    raw = raw_frame(scores)
    if not np.isfinite(raw[list(SCORE_COLUMNS)].to_numpy()).all():  # R5: never a NaN or inf in a CSV
        raise PipelineError(f'internal error: a non-finite algorithm-{algorithm} score escaped the guards')
    if saved_stats is None:
        normalised, stats = normalise(raw)
    else:
        normalised, stats = normalise_with_stats(raw, saved_stats), saved_stats
    image_dir = layout.relative(layout.filtered_dir)
    normalised.insert(1, 'img_path', [f'{image_dir}/{image_name(n)}' for n in img_nos])

    raw_text = raw.to_csv(index=False, lineterminator='\n')
    document = stats_document(stats, normalised, algorithm=algorithm, images=len(img_nos),
                              statistics_from=statistics_from, raw_sha256=sha256_of(raw_text.encode('utf-8')),
                              guard_hits={name: len(nos) for name, nos in summary.guard_hits.items()},
                              guarded_images=summary.guard_hits)
    # The stats file goes last: its presence marks a finished run for the resume check.
    outputs = (layout.property_scores_raw_csv(algorithm), layout.property_scores_csv(algorithm),
               layout.property_scores_stats(algorithm))
    atomic.write_text(outputs[0], raw_text)
    atomic.write_csv(outputs[1], normalised)
    write_stats(outputs[2], document)
    summary.written = list(outputs)
    return summary


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
