"""Stage 4: the seven property scores of every parsed image, normalised, with raw scores and statistics saved.

Inputs are the stage-3 files (``parsing_NNNNNN.png`` and, for algorithm 2, ``face_NNNNNN.png``; algorithm 1
reads its colours from the original image that stage 3 parsed: the file its record names, by default the filtered
``NNNNNN.jpg``). Outputs, in ``segmentation/property_score_results/``:

* ``all_scores[_v2]_raw.csv``: ``img_no``, the seven raw scores (full precision) and ``inputs_sha256``, the
  SHA-256 of the input files each row was computed from;
* ``all_scores[_v2].csv``: ``img_no``, a relative ``img_path`` (where stage 3 took the image from) and the
  z-scores rounded to 4 decimals;
* ``all_scores[_v2]_stats.json``: the algorithm, the score columns, per column mean, std (ddof = 1), n and the
  normalised range, plus the guard hits.

The stats file is written last and marks a finished run. A rerun reuses the raw scores of images whose input
files hold the same bytes (by SHA-256), scores the rest, renormalises, and writes only the files whose content
changes (R14).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ohlora import atomic
from ohlora.constants import SCORE_COLUMNS
from ohlora.errors import PipelineError
from ohlora.layout import (PARSING_MAP_GLOB, Layout, image_name, is_input_image, name_form, parse_img_no,
                           parsing_map_name)
from ohlora.records import load_record, sha256_bytes, sha256_of, write_if_changed
from segmentation import property_scores_alg1 as alg1
from segmentation import property_scores_alg2 as alg2
from segmentation.property_scores_common import ImageScores, check_colour, read_bgr, read_parsing_map
from segmentation.score_normalization import (
    ColumnStats, normalise, normalise_with_stats, read_raw_scores, read_stats, stats_document)

logger = logging.getLogger(__name__)

ALGORITHMS = (1, 2)
GUARDS = {1: alg1.GUARDS, 2: alg2.GUARDS}
FROM_THESE_SCORES = 'these scores'
# Below this many images per worker a process pool costs more than it saves.
MIN_IMAGES_PER_WORKER = 32


INPUTS_DIGEST = 'inputs_sha256'  # raw-CSV column: the content each row was computed from


@dataclass(frozen=True)
class ImageInputs:
    """Where one image's stage-3 results and original are, and how ``img_path`` names the original."""
    img_no: int
    parsing_map: Path
    face_crop: Path
    original: Path
    img_path: str

    def files(self, algorithm: int) -> tuple[Path, Path]:
        """(parsing map, colour source): the face crop (algorithm 2) or the original image (1)."""
        return self.parsing_map, self.original if algorithm == 1 else self.face_crop


def stage3_originals(layout: Layout) -> dict[int, str] | None:
    """{img_no: path from the root} of the images stage 3 parsed, from its record; None without one."""
    record = load_record(layout.segmentation_meta)
    inputs = record.get('inputs') if record is not None else None
    if not isinstance(inputs, dict):
        return None
    originals = {}
    for key, entry in inputs.items():
        if isinstance(entry, dict) and isinstance(entry.get('source'), str) and str(key).isdigit():
            originals[int(key)] = entry['source']
    return originals


def image_inputs(layout: Layout, img_nos: list[int]) -> dict[int, ImageInputs]:
    """The inputs of each image; the original is the file stage 3 recorded (e.g. of ``--images DIR``), else the
    filtered ``NNNNNN.jpg``."""
    originals = stage3_originals(layout) or {}
    filtered = layout.relative(layout.filtered_dir)
    result = {}
    for n in img_nos:
        source = originals.get(n, f'{filtered}/{image_name(n)}')
        result[n] = ImageInputs(n, layout.parsing_map(n), layout.face_crop(n), layout.resolve_from_root(source),
                                source)
    return result


def score_image(inputs: ImageInputs, algorithm: int) -> ImageScores:
    """Read one image's stage-3 files and compute its seven raw scores with the chosen algorithm."""
    map_path, colour_path = inputs.files(algorithm)
    parsing_map = read_parsing_map(map_path)
    if algorithm == 1:
        return alg1.compute_scores(inputs.img_no, parsing_map, alg1.read_colour(colour_path))
    face = check_colour(read_bgr(colour_path, 'face crop'), colour_path, 'face crop')
    return alg2.compute_scores(inputs.img_no, parsing_map, face)


def _score_chunk(task: tuple[int, list[ImageInputs]]) -> list[ImageScores]:
    algorithm, chunk = task
    return [score_image(inputs, algorithm) for inputs in chunk]


def _exit_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: exit when the stage's process is gone. A ``kill -9`` of the parent leaves the
    workers blocked on their task queue forever otherwise (they hold its other end themselves)."""
    first_parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != first_parent:  # reparented: whoever started us has died
                os._exit(1)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass

    threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def score_parsed_images(layout: Layout, algorithm: int, img_nos: list[int], *, workers: int = 1, chunk_size: int = 64,
                 progress: bool = True, inputs: dict[int, ImageInputs] | None = None) -> list[ImageScores]:
    """Scores of ``img_nos`` in their order; chunks of images go to a process pool when ``workers`` > 1."""
    inputs = inputs if inputs is not None else image_inputs(layout, img_nos)
    chunks = [img_nos[i:i + chunk_size] for i in range(0, len(img_nos), chunk_size)]
    tasks = [(algorithm, [inputs[n] for n in chunk]) for chunk in chunks]
    workers = max(1, min(workers, len(img_nos) // MIN_IMAGES_PER_WORKER, len(chunks)))
    results: list[ImageScores] = []
    with tqdm(total=len(img_nos), desc=f'property scores (algorithm {algorithm})', unit='img',
              disable=not progress or not img_nos, mininterval=1.0) as bar:
        if workers == 1:
            for task in tasks:
                results.extend(_score_chunk(task))
                bar.update(len(task[1]))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(),
                                     initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
                for chunk_result in pool.map(_score_chunk, tasks):
                    results.extend(chunk_result)
                    bar.update(len(chunk_result))
    return results


def parsed_images(layout: Layout) -> list[int]:
    """Sorted image numbers that stage 3 left a parsing map for (``Layout.parsing_map``)."""
    folder = layout.segmentation_dir
    if not folder.is_dir():
        raise PipelineError(f'{folder}: no such folder (the stage-3 parsing results; run stage 3 first)')
    found = []
    for path in folder.glob(PARSING_MAP_GLOB):
        img_no = parse_img_no(path.name)
        if img_no is not None and layout.parsing_map(img_no).name == path.name and path.is_file():
            found.append(img_no)
    if not found:
        raise PipelineError(f'{folder} holds no {name_form(parsing_map_name(0))} maps ({stage3_outcome(layout)})')
    return sorted(found)


def stage3_outcome(layout: Layout) -> str:
    """What stage 3 left when it left no parsing map: it skipped every image, or it has not run."""
    skipped = layout.segmentation_skipped_csv
    if skipped.is_file():
        try:
            count = len(pd.read_csv(skipped))
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            count = 0
        if count:
            return (f'stage 3 parsed no face: it skipped all {count} images, see {skipped} for why; stage 4 needs '
                    'parsed faces')
    return 'run stage 3 first'


def check_inputs(algorithm: int, inputs: list[ImageInputs]) -> None:
    """Fail before any work when an image lacks its colour source."""
    what = 'original image, whose colours algorithm 1 reads,' if algorithm == 1 else 'face crop'
    for item in inputs:
        colour = item.files(algorithm)[1]
        if not colour.is_file():
            raise PipelineError(f'{colour}: no such file (the {what} of parsed image {item.img_no:06d})')


def inputs_digest(item: ImageInputs, algorithm: int) -> str | None:
    """SHA-256 over the bytes of the files a score is computed from; None when one cannot be read."""
    try:
        return sha256_bytes(''.join(sha256_of(path) for path in item.files(algorithm)).encode('ascii'))
    except OSError:
        return None


@dataclass
class Stage4Report:
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
        out.append('up to date, nothing written' if self.up_to_date
                   else 'wrote ' + ', '.join(str(p) for p in self.written))
        return out


@dataclass(frozen=True)
class PreviousRun:
    """The raw scores of a finished earlier run, with the input digest each row was computed from."""
    raw: pd.DataFrame
    digests: dict[int, str]
    guards_of: dict[int, tuple[str, ...]]


def previous_run(layout: Layout, algorithm: int) -> PreviousRun | None:
    """The raw scores of a finished earlier run that the stats file vouches for, or None."""
    raw_path, stats_path = layout.property_scores_raw_csv(algorithm), layout.property_scores_stats(algorithm)
    document = load_record(stats_path)
    try:
        guarded = document['guarded_images']
        if not isinstance(guarded, dict) or document.get('raw_sha256') != sha256_of(raw_path):
            return None  # the stats file belongs to another raw CSV (e.g. a run stopped between the writes)
        raw = read_raw_scores(raw_path)
        digests = pd.read_csv(raw_path, usecols=['img_no', INPUTS_DIGEST], dtype={INPUTS_DIGEST: str})
        guards_of: dict[int, list[str]] = {}
        for name, nos in guarded.items():
            for n in nos:
                guards_of.setdefault(int(n), []).append(name)
    except (OSError, PipelineError, KeyError, TypeError, ValueError, pd.errors.ParserError):
        return None  # unusable (or written before rows recorded their inputs): everything is scored again
    return PreviousRun(raw, dict(zip(digests['img_no'].astype(int), digests[INPUTS_DIGEST])),
                       {n: tuple(names) for n, names in guards_of.items()})


def reusable_scores(previous: PreviousRun | None, digests: dict[int, str | None]) -> dict[int, ImageScores]:
    """Earlier raw scores of images whose input files hold the bytes those scores were computed from."""
    if previous is None:
        return {}
    values = previous.raw.loc[:, list(SCORE_COLUMNS)].to_numpy(dtype=np.float64)
    reused = {}
    for img_no, row in zip(previous.raw['img_no'].tolist(), values):
        if digests.get(img_no) is not None and previous.digests.get(img_no) == digests[img_no]:
            reused[img_no] = ImageScores(img_no, tuple(float(v) for v in row), previous.guards_of.get(img_no, ()))
    return reused


def raw_frame(scores: list[ImageScores], digests: dict[int, str | None]) -> pd.DataFrame:
    frame = pd.DataFrame([s.values for s in scores], columns=list(SCORE_COLUMNS), dtype=np.float64)
    frame.insert(0, 'img_no', np.array([s.img_no for s in scores], dtype=np.int64))
    frame[INPUTS_DIGEST] = [digests.get(s.img_no) or '' for s in scores]
    return frame


def unparsed_images(layout: Layout, parsed: list[int]) -> list[int]:
    """Images of the folder stage 3 read with neither a parsing map nor an entry in its skip list (unfinished?)."""
    record = load_record(layout.segmentation_meta)
    folder = layout.filtered_dir
    if record is not None and isinstance(record.get('images_dir'), str):
        folder = layout.resolve_from_root(record['images_dir'])
    if not folder.is_dir():
        return []
    present = {parse_img_no(p.name) for p in folder.iterdir() if is_input_image(p)}
    skipped: set[int] = set()
    if layout.segmentation_skipped_csv.is_file():
        try:
            skipped = set(pd.read_csv(layout.segmentation_skipped_csv)['img_no'].astype(int))
        except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
            pass
    return sorted(present - set(parsed) - skipped)


def compute_property_scores(layout: Layout, algorithm: int, *, stats_file: str | Path | None = None,
                            workers: int = 1, chunk_size: int = 64, force: bool = False,
                            progress: bool = True) -> Stage4Report:
    """Score every parsed image, normalise (with ``stats_file`` if given) and write the three outputs (each only
    when its content changes)."""
    if algorithm not in ALGORITHMS:
        raise PipelineError(f'unknown property-score algorithm {algorithm}; choose 1 or 2')
    saved_stats: dict[str, ColumnStats] | None = (read_stats(stats_file, algorithm) if stats_file is not None
                                                  else None)
    atomic.check_writable(layout.property_scores_dir)
    atomic.check_replaceable(layout.property_scores_raw_csv(algorithm), layout.property_scores_csv(algorithm),
                             layout.property_scores_stats(algorithm))
    img_nos = parsed_images(layout)
    statistics_from = FROM_THESE_SCORES if saved_stats is None else f'file {Path(stats_file).name}'

    inputs = image_inputs(layout, img_nos)
    check_inputs(algorithm, list(inputs.values()))
    digests = {n: inputs_digest(inputs[n], algorithm) for n in img_nos}
    reused = {} if force else reusable_scores(previous_run(layout, algorithm), digests)
    to_score = [n for n in img_nos if n not in reused]
    summary = Stage4Report(algorithm, len(img_nos), len(to_score), len(reused), {}, statistics_from,
                             unparsed=unparsed_images(layout, img_nos))
    if summary.unparsed:
        logger.warning('%d images of the folder stage 3 reads have no parsing map and are not in %s (first %06d); '
                       'is stage 3 finished?', len(summary.unparsed), layout.segmentation_skipped_csv.name,
                       summary.unparsed[0])

    fresh = score_parsed_images(layout, algorithm, to_score, workers=workers, chunk_size=chunk_size, progress=progress,
                         inputs=inputs)
    by_img = {**reused, **{s.img_no: s for s in fresh}}
    scores = [by_img[n] for n in img_nos]
    summary.guard_hits = {name: [s.img_no for s in scores if name in s.guards] for name in GUARDS[algorithm]}

    raw = raw_frame(scores, digests)
    if not np.isfinite(raw[list(SCORE_COLUMNS)].to_numpy()).all():  # R5: never a NaN or inf in a CSV
        raise PipelineError(f'internal error: a non-finite algorithm-{algorithm} score escaped the guards')
    if saved_stats is None:
        normalised, stats = normalise(raw.drop(columns=[INPUTS_DIGEST]))
    else:
        normalised, stats = normalise_with_stats(raw.drop(columns=[INPUTS_DIGEST]), saved_stats), saved_stats
    normalised.insert(1, 'img_path', [inputs[n].img_path for n in img_nos])

    raw_text = atomic.csv_text(raw)
    document = stats_document(stats, normalised, algorithm=algorithm, images=len(img_nos),
                              statistics_from=statistics_from, raw_sha256=sha256_bytes(raw_text.encode('utf-8')),
                              guard_hits={name: len(nos) for name, nos in summary.guard_hits.items()},
                              guarded_images=summary.guard_hits)
    # The stats file goes last: its presence marks a finished run for the resume check.
    outputs = {layout.property_scores_raw_csv(algorithm): raw_text,
               layout.property_scores_csv(algorithm): atomic.csv_text(normalised),
               layout.property_scores_stats(algorithm): atomic.json_text(document)}
    summary.written = [path for path, text in outputs.items() if write_if_changed(path, text.encode('utf-8'))]
    summary.up_to_date = not summary.written
    return summary


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
