"""One attribute-control evaluation run: render every (z, label), measure, and write the figures, resumably.

Images are what a user of the pipeline gets: the generator's output through GenForce's uint8 conversion and
OpenCV's JPEG (quality 95, as stages 1 and 6 write them), decoded again with OpenCV; every measurer, judge
and the identity embedding read those decoded pixels. The JPEG is kept in the run folder, so a resumed run
measures exactly the pixels an uninterrupted one would.

Work goes z by z (batches may span z): once all images of a z are measured, its ``scores/zNNNNNN.csv`` and its
sweep grid are written. A rerun skips z that have a score file, decodes the images that exist instead of
rendering them, and recomputes the figures from the score files. The folder's ``evaluation_settings.json``
keys it on content (generator files' SHA-256, image size and encoding, grid, measurer / judge / identity
settings, the z digests); a rerun with other settings is refused naming the difference, before anything is
written. More z (a larger ``--num``) extend a folder: z shared with earlier runs must be identical.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.errors import PipelineError
from ohlora.layout import PLOT_SUFFIX, PROPERTY_NAMES, AttributeControlFolder
from ohlora.records import differences, sha256_of
from stylegan.postprocess import require_finite, to_uint8
from stylegan_modified import evaluation_plots as plots
from stylegan_modified.attribute_metrics import grid_labels
from stylegan_modified.attribute_measurers import Measurer
from stylegan_modified.controllable import ControllableGenerator
from stylegan_modified.delivered_images import ENCODING, decode_jpeg, encode_jpeg
from stylegan_modified.evaluation_figures import compute_figures
from stylegan_modified.evaluation_inputs import requested_values, swept_attributes, z_digest
from stylegan_modified.evaluation_report import (
    UPSTREAM_REFERENCE, console_lines, json_safe, per_image_table, per_z_table, summary_markdown)
from stylegan_modified.face_identity import identity_scores
from stylegan_modified.gender_quality_judge import JUDGED
from stylegan_modified.sweep_grid import sweep_grid

RECORD_FORMAT = 1
IMAGE_ENCODING = f'{ENCODING} before measuring'
GRID_CELL = 128  # sweep-grid cell size in pixels: 50 cells of 256 would make a 3-4 MB PNG per z
MEASURED_COLUMNS = [f'measured_{name}' for name in PROPERTY_NAMES]


@dataclass
class EvaluationInputs:
    """Everything that decides a run's numbers. ``embedder`` / ``judge`` are None when left out (``left_out``
    says why, one line each)."""
    generator: ControllableGenerator
    measurer: Measurer
    z: np.ndarray                       # float32 (Z, z_dim)
    grid: dict[str, tuple[float, ...]]
    generator_files: tuple[Path, ...] = ()
    z_source: str = ''
    embedder: object | None = None      # FaceEmbedder-like: embed(images) -> (N, d) unit vectors, settings()
    judge: object | None = None         # EnsembleJudge-like: scores(images) -> {'gender','quality'}, settings()
    left_out: list[str] = field(default_factory=list)


@dataclass
class EvaluationResult:
    folder: AttributeControlFolder
    rendered: int          # images drawn by the generator in this run
    decoded: int           # images read back from earlier runs instead
    scored_z: int          # z measured in this run
    reused_z: int          # z whose scores an earlier run left
    summary: dict
    lines: list[str]

    def report_lines(self) -> list[str]:
        """What the script prints: the counts of this run, then the summary table lines."""
        return [f'{self.rendered} images rendered, {self.decoded} read back, {self.scored_z} z measured, '
                f'{self.reused_z} z already measured; folder {self.folder.folder}', *self.lines]


# --- the settings record (compared as every stage's: ohlora.records.differences) ----------------------------------
def settings_record(inputs: EvaluationInputs, image_size: tuple[int, int]) -> dict:
    generator = inputs.generator
    return {
        'format': RECORD_FORMAT,
        'generator': {'name': generator.name, 'score_algorithm': generator.score_algorithm,
                      'trained_attributes': list(generator.trained_attributes),
                      'files': {Path(p).name: sha256_of(Path(p)) for p in inputs.generator_files}},
        'image_size': list(image_size),
        'image_encoding': IMAGE_ENCODING,
        'grid': [[attribute, list(values)] for attribute, values in inputs.grid.items()],
        'measure': inputs.measurer.settings(),
        'identity': inputs.embedder.settings() if inputs.embedder is not None else None,
        'shares': inputs.judge.settings() if inputs.judge is not None else None,
    }


def _has_run_files(folder: AttributeControlFolder) -> bool:
    return any(p.is_dir() and any(p.iterdir()) for p in (folder.scores_dir, folder.folder / 'images'))


def check_resumable(folder: AttributeControlFolder, record: dict, z_digests: dict[str, str],
                    z_source: str) -> dict[str, str]:
    """The z digests of the folder merged with this run's, after making sure the folder's files were made with
    ``record``; otherwise one line naming the first differences."""
    path = folder.settings_json
    if not path.is_file():
        if _has_run_files(folder):
            raise PipelineError(f'{folder.folder} holds evaluation files but no {path.name} says how they were made; '
                                'choose another --outdir or move them away')
        return dict(z_digests)
    try:
        recorded = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get('z'), dict) \
            or not isinstance(recorded['z'].get('digests'), dict):
        raise PipelineError(f'{path} is not a settings record of this evaluation; delete the folder or choose '
                            'another --outdir')
    changed = differences({k: v for k, v in recorded.items() if k != 'z'}, record)
    if changed:
        detail = ', '.join(changed[:3])
        raise PipelineError(f'{folder.folder} holds an evaluation made with other settings ({detail}); rerun with '
                            'the same settings, or choose another --outdir')
    old = recorded['z']['digests']
    clash = [k for k, digest in z_digests.items() if k in old and old[k] != digest]
    if clash:
        raise PipelineError(f'{folder.folder} holds an evaluation of another z {clash[0]} (that folder: '
                            f'{recorded["z"].get("source", "?")}; this run: {z_source}); rerun with the same z, '
                            'or choose another --outdir')
    return {**old, **z_digests}


# --- images ----------------------------------------------------------------------------------------------------

def _read_image(path: Path) -> np.ndarray | None:
    try:
        return decode_jpeg(path.read_bytes())
    except OSError:
        return None


def _render(generator: ControllableGenerator, z: np.ndarray, labels: np.ndarray, names: list[str]) -> np.ndarray:
    """uint8 images of (z, label) pairs named ``names`` (for the message); NaN or infinite pixels are refused
    before anything of the batch is written: the uint8 conversion would make them black images."""
    with torch.inference_mode():
        images = generator.images(torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(labels))
    require_finite(images, names, 'check the generator\'s weights and the --grid values')
    return to_uint8(images)


def _image_name(z_index: int, label_index: int) -> str:
    return f'z {z_index} label {label_index}'



def probe_image_size(inputs: EvaluationInputs, folder: AttributeControlFolder, labels: np.ndarray) -> tuple[int, int]:
    """(height, width) of the generator's images: from an image already in the folder, else one rendered image."""
    existing = _read_image(folder.image(0, 0)) if folder.image(0, 0).is_file() else None
    image = existing if existing is not None else _render(inputs.generator, inputs.z[:1], labels[:1],
                                                          [_image_name(0, 0)])[0]
    return int(image.shape[0]), int(image.shape[1])


# --- per-z score files -----------------------------------------------------------------------------------------

@dataclass
class ZScores:
    measured: np.ndarray                 # (L, 7)
    judged: dict[str, np.ndarray]        # 'gender' / 'quality' -> (L,)
    identity: np.ndarray | None          # (L,)


def _score_frame(scores: ZScores) -> pd.DataFrame:
    frame = pd.DataFrame(scores.measured, columns=MEASURED_COLUMNS)
    frame.insert(0, 'label_index', np.arange(len(frame)))
    for prop, values in scores.judged.items():
        frame[prop] = values
    if scores.identity is not None:
        frame['identity'] = scores.identity
    return frame


def read_z_scores(path: Path, num_labels: int, judged: tuple[str, ...], identity: bool) -> ZScores | None:
    """The scores of one finished z, or None when the file is missing or not a complete score file."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
        if list(frame['label_index']) != list(range(num_labels)):
            return None
        measured = frame[MEASURED_COLUMNS].to_numpy(dtype=np.float64)
        scores = {prop: frame[prop].to_numpy(dtype=np.float64) for prop in judged}
        similarity = frame['identity'].to_numpy(dtype=np.float64) if identity else None
    except (KeyError, ValueError, TypeError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    return ZScores(measured, scores, similarity)


# --- sweep grids -----------------------------------------------------------------------------------------------

def _cell(rgb: np.ndarray) -> np.ndarray:
    height = rgb.shape[0]
    interpolation = cv2.INTER_AREA if height > GRID_CELL else cv2.INTER_NEAREST
    return cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), (GRID_CELL, GRID_CELL), interpolation=interpolation)


def sweep_grid_png(images: list[np.ndarray], grid: dict[str, tuple[float, ...]], title: str) -> bytes:
    """One labelled grid of a z's images: columns = the last swept attribute, rows = the other combinations."""
    sizes = [len(v) for v in grid.values()]
    names = list(grid)
    swept = swept_attributes(grid)
    column_axis = names.index(swept[-1])
    row_axes = [k for k in range(len(names)) if k != column_axis]
    row_sizes = [sizes[k] for k in row_axes]
    num_rows = int(np.prod(row_sizes)) if row_axes else 1
    cells = [[None] * sizes[column_axis] for _ in range(num_rows)]
    row_labels = [''] * num_rows
    for index, image in enumerate(images):
        position = np.unravel_index(index, sizes)
        row = int(np.ravel_multi_index([position[k] for k in row_axes], row_sizes)) if row_axes else 0
        cells[row][position[column_axis]] = _cell(image)
        row_labels[row] = ' / '.join(f'{grid[names[k]][position[k]]:g}' for k in row_axes
                                     if sizes[k] > 1) or 'all'
    row_names = ' / '.join(names[k] for k in row_axes if sizes[k] > 1)
    fixed = ', '.join(f'{n} {grid[n][0]:g}' for n in names if len(grid[n]) == 1)
    full_title = f'{title}; rows: {row_names or "-"}; columns: {names[column_axis]}' + (f'; {fixed}' if fixed else '')
    column_labels = [f'{names[column_axis]} {v:g}' for v in grid[names[column_axis]]]
    canvas = sweep_grid(cells, row_labels, column_labels, full_title)
    return atomic.encode_image(PLOT_SUFFIX, canvas)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic.write_bytes(path, data)
    return True


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator='\n').encode('utf-8')


# --- the run ---------------------------------------------------------------------------------------------------

def _check_sizes(inputs: EvaluationInputs, size: tuple[int, int]) -> None:
    name = inputs.generator.name
    needed = getattr(inputs.measurer, 'image_size', None)
    if needed is not None and tuple(needed) != tuple(size):
        raise PipelineError(f'the {name} generator draws {size[1]}x{size[0]} images, but the {inputs.measurer.name} '
                            f'measurer reads {needed[1]}x{needed[0]}; use --measure parsing')
    judge_size = getattr(inputs.judge, 'image_size', None)
    if inputs.judge is not None and judge_size is not None and tuple(judge_size) != tuple(size):
        inputs.judge = None
        inputs.left_out.append(f'female and good-quality shares: the stage-2 CNNs read {judge_size[1]}x'
                               f'{judge_size[0]} images, the {name} generator draws {size[1]}x{size[0]}')


PLOTS = ('r_mae', 'r_distribution', 'leakage')


def check_outputs(folder: AttributeControlFolder, num_z: int, num_labels: int) -> None:
    """Every folder the run writes into can be written, and no folder (or anything but a file) sits where one of
    its files goes: checked before anything is written, else the run would stop half-way with files written."""
    atomic.check_writable(folder.folder, folder.scores_dir, folder.sweep_grid(0).parent, folder.plot(PLOTS[0]).parent,
                          *(folder.image_dir(z) for z in range(num_z)))
    atomic.check_replaceable(folder.settings_json, folder.z_csv, folder.per_image_csv, folder.per_z_csv,
                             folder.summary_json, folder.summary_md, *(folder.plot(name) for name in PLOTS),
                             *(folder.z_scores(z) for z in range(num_z)), *(folder.sweep_grid(z) for z in range(num_z)),
                             *(folder.image(z, k) for z in range(num_z) for k in range(num_labels)))


def evaluate(inputs: EvaluationInputs, folder: AttributeControlFolder, batch_size: int = 8,
             progress: bool = True, title: str | None = None, run_info: dict | None = None) -> EvaluationResult:
    """Render, measure and summarise every (z, label) of ``inputs`` into ``folder`` (resuming what is there)."""
    if batch_size < 1:
        raise PipelineError(f'--batch-size must be at least 1, got {batch_size}')
    if len(inputs.z) < 1:
        raise PipelineError('no z to evaluate')
    swept = swept_attributes(inputs.grid)
    if not swept:
        raise PipelineError('the label grid varies no attribute')
    labels = grid_labels(inputs.grid)
    num_z, num_labels = len(inputs.z), len(labels)
    generator = inputs.generator
    title = title or f'{generator.name}, {inputs.measurer.name}'
    check_outputs(folder, num_z, num_labels)

    size = probe_image_size(inputs, folder, labels)
    _check_sizes(inputs, size)
    record = settings_record(inputs, size)
    digests = {str(i): z_digest(z) for i, z in enumerate(inputs.z)}
    merged = check_resumable(folder, record, digests, inputs.z_source)
    # Nothing was written up to here: every refusal leaves the folder as it was.

    try:
        folder.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f'cannot write into {folder.folder}: {exc.strerror or exc}') from None
    _write_if_changed(folder.settings_json, (json.dumps(
        {**record, 'z': {'source': inputs.z_source, 'digests': merged}}, indent=2) + '\n').encode('utf-8'))
    z_frame = pd.DataFrame(inputs.z, columns=[f'z{k}' for k in range(inputs.z.shape[1])])
    z_frame.insert(0, 'z_index', np.arange(num_z))
    _write_if_changed(folder.z_csv, _csv_bytes(z_frame))

    judged_props = JUDGED if inputs.judge is not None else ()
    has_identity = inputs.embedder is not None
    finished = {z for z in range(num_z)
                if read_z_scores(folder.z_scores(z), num_labels, judged_props, has_identity) is not None}
    reused_z = len(finished)
    todo = [(zi, li) for zi in range(num_z) if zi not in finished for li in range(num_labels)]

    rendered = decoded = 0
    pending: dict[int, _PendingZ] = {}
    bar = tqdm(total=len(todo), desc=f'evaluating {generator.name}', unit='img', disable=not progress)
    with ThreadPoolExecutor(max_workers=4) as pool:  # JPEG coding releases the GIL
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images, drawn = _batch_images(inputs, folder, batch, labels, pool)
            rendered, decoded = rendered + drawn, decoded + len(batch) - drawn
            measured, judged, embeddings = _measure(inputs, np.stack(images))
            for k, (zi, li) in enumerate(batch):
                entry = pending.setdefault(zi, _PendingZ(num_labels, judged_props))
                entry.add(li, measured[k], {p: judged[p][k] for p in judged_props},
                          None if embeddings is None else embeddings[k], images[k])
                if entry.complete:
                    _finish_z(folder, zi, pending.pop(zi), inputs.grid, title)
            bar.update(len(batch))
    bar.close()

    for z_index in range(num_z):  # grids of finished z whose PNG is missing (e.g. deleted by hand)
        if not folder.sweep_grid(z_index).is_file():
            images = [_read_image(folder.image(z_index, li)) for li in range(num_labels)]
            if all(image is not None for image in images):
                png = sweep_grid_png(images, inputs.grid, f'{title}, z {z_index}')
                _write_if_changed(folder.sweep_grid(z_index), png)

    # The figures always come from the score files as read back, so a resumed run computes from the same values.
    scores = [read_z_scores(folder.z_scores(z), num_labels, judged_props, has_identity) for z in range(num_z)]
    if any(s is None for s in scores):
        raise PipelineError(f'{folder.scores_dir} lost a score file during the run; rerun to measure it again')
    summary = _write_figures(inputs, folder, requested_values(inputs.grid), scores, swept, title,
                             {**(run_info or {}), 'z_source': inputs.z_source, 'labels_per_z': num_labels,
                              'images': num_z * num_labels})
    return EvaluationResult(folder, rendered, decoded, num_z - reused_z, reused_z, summary,
                            console_lines(summary, folder))


class _PendingZ:
    """The measurements of one z, collected across batches until every label is in."""

    def __init__(self, num_labels: int, judged_props: tuple[str, ...]):
        self.measured = np.full((num_labels, len(PROPERTY_NAMES)), np.nan)
        self.judged = {p: np.full(num_labels, np.nan) for p in judged_props}
        self.embeddings: list[np.ndarray | None] = [None] * num_labels
        self.images: list[np.ndarray | None] = [None] * num_labels
        self.count = 0

    def add(self, label_index: int, measured: np.ndarray, judged: dict[str, float], embedding, image) -> None:
        self.measured[label_index] = measured
        for prop, value in judged.items():
            self.judged[prop][label_index] = value
        self.embeddings[label_index] = embedding
        self.images[label_index] = image
        self.count += 1

    @property
    def complete(self) -> bool:
        return self.count == len(self.images)

    def scores(self) -> ZScores:
        identity = None if self.embeddings[0] is None else identity_scores(np.stack(self.embeddings))
        return ZScores(self.measured, self.judged, identity)


def _batch_images(inputs: EvaluationInputs, folder: AttributeControlFolder, batch: list[tuple[int, int]],
                  labels: np.ndarray, pool: ThreadPoolExecutor) -> tuple[list[np.ndarray], int]:
    """The decoded images of a batch: read back where a JPEG exists, else rendered (one generator call) and
    written; and how many were rendered."""
    images = [_read_image(folder.image(zi, li)) if folder.image(zi, li).is_file() else None for zi, li in batch]
    missing = [k for k, image in enumerate(images) if image is None]  # new, or unreadable: drawn again
    if missing:
        drawn = _render(inputs.generator, inputs.z[[batch[k][0] for k in missing]],
                        labels[[batch[k][1] for k in missing]], [_image_name(*batch[k]) for k in missing])
        jpegs = list(pool.map(encode_jpeg, drawn))
        for k, data in zip(missing, jpegs):
            atomic.write_bytes(folder.image(*batch[k]), data)
        for k, image in zip(missing, pool.map(decode_jpeg, jpegs)):
            images[k] = image
    return images, len(missing)


def _measure(inputs: EvaluationInputs, images: np.ndarray):
    """(measured (N, 7) with NaN rows, judged {prop: (N,)}, embeddings (N, d) or None) of one batch."""
    measured = np.asarray(inputs.measurer.measure(images), dtype=np.float64)
    if measured.shape != (len(images), len(PROPERTY_NAMES)):
        raise PipelineError(f'the {inputs.measurer.name} measurer returned shape {measured.shape} for '
                            f'{len(images)} images; expected ({len(images)}, {len(PROPERTY_NAMES)})')
    measured[~np.isfinite(measured).all(axis=1)] = np.nan  # a partly measured image counts as not measured
    judged = inputs.judge.scores(images) if inputs.judge is not None else {}
    embeddings = inputs.embedder.embed(images) if inputs.embedder is not None else None
    return measured, judged, embeddings


def _finish_z(folder: AttributeControlFolder, z_index: int, entry: _PendingZ, grid, title: str) -> None:
    atomic.write_bytes(folder.z_scores(z_index), _csv_bytes(_score_frame(entry.scores())))
    _write_if_changed(folder.sweep_grid(z_index), sweep_grid_png(entry.images, grid, f'{title}, z {z_index}'))


def _write_figures(inputs: EvaluationInputs, folder: AttributeControlFolder, requested: np.ndarray,
                   scores: list[ZScores], swept, title: str, run: dict) -> dict:
    measured = np.stack([s.measured for s in scores])
    judged = ({p: np.stack([s.judged[p] for s in scores]) for p in scores[0].judged}
              if inputs.judge is not None else None)
    identity = np.stack([s.identity for s in scores]) if inputs.embedder is not None else None
    figures = compute_figures(requested, measured, swept, judged, identity)
    summary = json_safe({'run': {'model': inputs.generator.name, 'measure': inputs.measurer.name,
                                 'algorithm': inputs.measurer.algorithm,
                                 'model_score_algorithm': inputs.generator.score_algorithm, **run},
                         'grid': {a: list(v) for a, v in inputs.grid.items()},
                         **figures.summary(), 'left_out': list(inputs.left_out)})
    summary['upstream_reference'] = UPSTREAM_REFERENCE
    _write_if_changed(folder.per_image_csv, _csv_bytes(per_image_table(folder, requested, measured, judged, identity)))
    _write_if_changed(folder.per_z_csv, _csv_bytes(per_z_table(figures)))
    _write_if_changed(folder.summary_json, (json.dumps(summary, indent=2) + '\n').encode('utf-8'))
    _write_if_changed(folder.summary_md, summary_markdown(summary).encode('utf-8'))
    r_mae, r_distribution, leakage = PLOTS
    _write_if_changed(folder.plot(r_mae), plots.r_and_mae(figures, title))
    _write_if_changed(folder.plot(r_distribution), plots.r_distribution(figures, title))
    _write_if_changed(folder.plot(leakage), plots.leakage_heat_map(figures, PROPERTY_NAMES, title))
    return summary
