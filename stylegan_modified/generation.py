"""Stage 6: Oh-LoRA images with chosen attribute values from a fine-tuned conditional generator (PIPELINE.md §8).

Image *i* uses z_i = z_csv + variation * N(0, I), the noise drawn in float64 from an RNG that depends only on
(seed, i), then cast to float32 (upstream adds unseeded ``np.random.randn`` to the float64 CSV vector); image 0
is the CSV z itself. Every image of a run shares one label. The generator runs in eval mode with no truncation
and its stored noise maps, as upstream's ``G_kwargs_val``. Images are GenForce's uint8 conversion written as
OpenCV JPEGs (quality 95), as upstream.

A sweep renders every z for each value of one attribute (the other attributes as given), writes those images
and one labelled grid (rows = z, columns = values). Each output folder records its settings, the generator and
the base z identified by the SHA-256 of their content (not by file names or sizes); a rerun with the same
settings skips the images already there, other settings are refused instead of mixing two runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.amp import autocast
from ohlora.constants import PROPERTY_NAMES
from ohlora.devices import item_generator
from ohlora.distributed import Shard
from ohlora.errors import PipelineError
from ohlora.image_writer import BatchImageWriter
from ohlora.layout import GenerationFolder
from ohlora.records import (aligned_batches, read_record, refuse_other_settings, scan_outputs, write_if_changed,
                            write_record, write_z_record)
from ohlora.sharding import ShardRecords, merge_command
from ohlora.tables import read_table
from stylegan.postprocess import require_finite, to_uint8
from stylegan_modified.controllable import ControllableGenerator
from stylegan_modified.labels import label_vector
from stylegan_modified.sweep_grid import sweep_grid

Z_NOISE_STREAM = 0
DEFAULT_MERGE_COMMAND = merge_command('6')  # the messages' merge command when a caller names none
Z_RULE = 'z_i = float32(z_csv + variation * N(0, I) drawn in float64 from (seed, i)); z_0 = z_csv'


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the pixels of an image of a folder; a resumed run must use the same."""
    model: str
    weights_sha256: str    # the generator, by content
    z_sha256: str          # the CSV z as float64, by content
    seed: int
    variation: float
    label: dict = field(default_factory=dict)   # for a sweep, the swept attribute is None (it varies)
    sweep: str | None = None
    z_rule: str = Z_RULE
    directions_sha256: str | None = None        # --model directions: the directions file, by content
    amp: str | None = None                      # --amp: the autocast dtype (None: float32)

    def as_json(self) -> dict:
        record = asdict(self)
        for key in ('directions_sha256', 'amp'):  # absent when unused: the earlier records stay as they were
            if record[key] is None:
                del record[key]
        return record


def read_z_csv(path: str | Path, z_dim: int) -> np.ndarray:
    """The float64 z [z_dim] of a one-row CSV with the header 0,1,...,n-1 (upstream's test_z_vector_*.csv)."""
    path = Path(path)
    frame = read_table(path, (), 'z vector CSV')
    expected = [str(k) for k in range(frame.shape[1])]
    if [str(c) for c in frame.columns] != expected:
        raise PipelineError(f'{path} is not a z vector CSV: its header must be 0,1,...,n-1 '
                            f'(it starts {",".join(map(str, frame.columns[:4]))})')
    if len(frame) != 1:
        raise PipelineError(f'{path} holds {len(frame)} rows; a z vector CSV holds one z (one row)')
    if frame.shape[1] != z_dim:
        raise PipelineError(f'{path} holds a z of {frame.shape[1]} values, but the generator takes z of {z_dim}')
    try:
        z = frame.to_numpy(dtype=np.float64)[0]
    except (TypeError, ValueError):
        raise PipelineError(f'{path} has non-numeric values (z vector CSV)') from None
    if not np.isfinite(z).all() or not np.isfinite(z.astype(np.float32)).all():
        raise PipelineError(f'{path} has NaN or infinite values, or values beyond float32 (z vector CSV)')
    return z


def varied_latent(base_z: np.ndarray, seed: int, img_no: int, variation: float) -> torch.Tensor:
    """float32 z of image ``img_no``: the CSV z for image 0, else CSV z + variation * N(0, I) from (seed, img_no)."""
    z = torch.from_numpy(np.asarray(base_z, dtype=np.float64))
    if img_no > 0 and variation != 0:
        noise = torch.randn(z.shape[0], generator=item_generator(seed, img_no, Z_NOISE_STREAM), dtype=torch.float64)
        z = z + variation * noise
    return z.to(torch.float32)


@torch.inference_mode()
def render_labelled(generator: ControllableGenerator, z: torch.Tensor, labels: torch.Tensor,
                    img_nos: list[int], amp: bool = False) -> np.ndarray:
    """uint8 NHWC RGB images for z and the requested values (for the conditional generators: G(z, label) with
    upstream's inference settings, no truncation and the stored noise); ``amp``: under bfloat16 autocast."""
    with autocast(generator.device, amp):
        image = generator.images(z, labels).float()
    require_finite(image, img_nos, 'check the weights file and the attribute values')
    return to_uint8(image)


def images_present(files: GenerationFolder) -> dict[str, int]:
    """{file name: image number} of the images of this kind already in the folder (regular files only)."""
    return scan_outputs(files.folder, files.image_pattern(), 'a stage-6 image').found


def check_outputs(files: GenerationFolder) -> None:
    """The folder can be written, no folder sits where a record or the grid goes, and only regular files carry
    image names (before anything runs)."""
    atomic.check_writable(files.folder)
    atomic.check_replaceable(files.settings_json, files.z_csv, *([files.grid] if files.sweep else []))
    images_present(files)


def read_settings(files: GenerationFolder) -> dict | None:
    return read_record(files.settings_json, 'settings record of this stage',
                       'delete it together with the images it describes, or choose another --outdir')


def resumable_images(files: GenerationFolder, settings: GenerationSettings | dict,
                     vouched_by_shards: bool = False) -> dict[str, int]:
    """The images already there, after making sure they were made with ``settings`` (else one-line error).
    ``vouched_by_shards``: without a settings record, the records of a split run (checked to hold these settings)
    say how the images were made."""
    existing = images_present(files)
    recorded = read_settings(files)
    if recorded is None and vouched_by_shards:
        return existing
    refuse_other_settings(recorded, settings if isinstance(settings, dict) else settings.as_json(),
                          outputs=len(existing), folder=files.folder, record_path=files.settings_json, noun='images',
                          remedy='choose another --outdir or move them away')
    return existing


def shard_records(files: GenerationFolder, merge_command: str = DEFAULT_MERGE_COMMAND) -> ShardRecords:
    return ShardRecords(files.shard_records, merge_command)


def write_folder_records(files: GenerationFolder, settings: dict, names: dict | None, img_nos: list[int],
                         base_z: np.ndarray) -> None:
    """The settings record and the z record of the images ``img_nos`` (each written only if it changes)."""
    write_record(files.settings_json, settings, **(names or {}))
    write_z_record(files.z_csv, img_nos, torch.stack([varied_latent(base_z, settings['seed'], n, settings['variation'])
                                                      for n in img_nos]).numpy())


@dataclass
class GenerationResult:
    written: int
    skipped: int
    grid: Path | None = None
    folder: Path | None = None


def _value_label(attribute: str, value: float) -> str:
    return f'{attribute} = {value:g}'


def generate_images(generator: ControllableGenerator, files: GenerationFolder, settings: GenerationSettings,
                    base_z: np.ndarray, values: dict[str, float], num: int, batch_size: int,
                    sweep_values: list[float] | None = None, progress: bool = True,
                    names: dict | None = None, shard: Shard | None = None,
                    merge_command: str = DEFAULT_MERGE_COMMAND) -> GenerationResult:
    """Write images 0..num-1 (each sweep value, for a sweep) that are not there yet; for a sweep also the grid.

    ``names`` (e.g. the weights and z file names) go into the settings record for the reader; they decide nothing.
    With ``shard``, only the images of its batches, and its shard record instead of the folder's records and grid
    (see :func:`merge_shards`; ``merge_command`` is how its messages name the merge).
    """
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    sweep = files.sweep
    if (sweep is None) != (sweep_values is None):
        raise PipelineError('a sweep needs both an attribute and its values')
    shard = shard or Shard()
    check_outputs(files)
    columns = [None] if sweep is None else list(sweep_values)
    records = shard_records(files, merge_command)
    key = {'settings': settings.as_json(), 'num': num, 'batch_size': batch_size, 'columns': columns,
           'values': dict(values), 'base_z': [float(v) for v in np.asarray(base_z, dtype=np.float64)]}
    if shard.whole:
        records.refuse_unmerged()
    else:
        records.check_start(shard, key)
    existing = resumable_images(files, settings, vouched_by_shards=not shard.whole and records.exist())
    items = [(n, value) for n in range(num) for value in columns]  # row-major: the grid's reading order
    batches = aligned_batches(items, {item for item in items if files.image_name(*item) in existing}, batch_size,
                              None if shard.whole else shard)
    todo = [(n, v) for batch in batches for n, v in batch if files.image_name(n, v) not in existing]
    img_nos = sorted(set(existing.values()) | {n for n, _ in items})

    def record(finished: bool = False) -> None:  # after the first batch rendered: a refused batch changes nothing
        if shard.whole:
            write_folder_records(files, settings.as_json(), names, img_nos, base_z)
        else:
            records.write(shard, key, finished=finished, names=names or {})

    missing = set(todo)
    bar = tqdm(total=len(todo), desc=f'generating ({settings.model})', unit='img', disable=not progress)
    with BatchImageWriter(on_written=bar.update) as writer:  # JPEGs are written while the next batch renders
        for index, batch in enumerate(batches):
            z = torch.stack([varied_latent(base_z, settings.seed, n, settings.variation) for n, _ in batch])
            labels = torch.from_numpy(np.stack([label_vector({**values, **({sweep: v} if sweep else {})})
                                                for _, v in batch]))
            images = render_labelled(generator, z, labels, [n for n, _ in batch], amp=settings.amp is not None)
            if index == 0:
                record()
            writer.submit((files.image(n, v), rgb[:, :, ::-1]) for (n, v), rgb in zip(batch, images)
                          if (n, v) in missing)
    bar.close()
    if not todo or not shard.whole:
        record(finished=True)  # a finished rerun writes nothing: both records are written only when they change

    result = GenerationResult(written=len(todo), skipped=len(items) - len(todo), folder=files.folder)
    if sweep is not None and shard.whole:
        result.grid = write_grid(files, settings.as_json(), num, columns, values)
    return result


def write_grid(files: GenerationFolder, settings: dict, num: int, columns: list[float], values: dict) -> Path:
    """The labelled grid of a sweep folder (rows = z, columns = values), written only if it changes.

    The cells are the JPEGs read back one at a time as the grid is drawn (nothing of the run is kept in memory),
    so a resumed or merged run composes exactly the grid of an uninterrupted one."""
    sweep = files.sweep

    def cell(row: int, column: int) -> np.ndarray:
        path = files.image(row, columns[column])
        try:
            image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        except OSError as exc:
            raise PipelineError(f'cannot read {path} for the grid: {exc.strerror or exc}') from None
        if image is None:
            raise PipelineError(f'{path} is not a readable image; delete it and rerun to render it again')
        return image

    rows = ['z 0 (CSV)' if n == 0 else f'z {n}' for n in range(num)]
    others = ', '.join(f'{k} {values.get(k, 0.0):g}' for k in PROPERTY_NAMES if k != sweep)
    title = f'{settings["model"]}: {sweep} sweep, seed {settings["seed"]}; {others}'
    grid = sweep_grid(cell, rows, [_value_label(sweep, v) for v in columns], title)
    write_if_changed(files.grid, atomic.encode_image(files.grid.suffix, grid))
    return files.grid


def merge_shards(files: GenerationFolder, merge_command: str = DEFAULT_MERGE_COMMAND) -> GenerationResult:
    """The settings record, the z record and (for a sweep) the grid of a split run, exactly as one process writes
    them, from the records of its finished shards (then removed)."""
    records = shard_records(files, merge_command)
    shards = records.collect()
    key, names = shards[0]['key'], shards[0].get('names') or {}
    settings, num, columns = key['settings'], key['num'], key['columns']
    if (files.sweep is None) != (columns == [None]) or settings.get('sweep') != files.sweep:
        raise PipelineError(f'the shard records in {records.folder} are not those of this folder\'s sweep')
    check_outputs(files)
    existing = resumable_images(files, settings, vouched_by_shards=True)
    items = [(n, value) for n in range(num) for value in columns]
    missing = [item for item in items if files.image_name(*item) not in existing]
    if missing:
        count, position = len(shards), items.index(missing[0])
        raise PipelineError(f'{files.image(*missing[0])} is missing, although every shard finished (deleted since?); '
                            f'rerun shard {(position // key["batch_size"]) % count}/{count}, then merge')
    base_z = np.asarray(key['base_z'], dtype=np.float64)
    write_folder_records(files, settings, names, sorted(set(existing.values()) | set(range(num))), base_z)
    result = GenerationResult(written=0, skipped=len(items), folder=files.folder)
    if files.sweep is not None:
        result.grid = write_grid(files, settings, num, columns, key['values'])
    records.remove()
    return result
