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
from ohlora.constants import PROPERTY_NAMES
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.image_writer import BatchImageWriter
from ohlora.layout import GenerationFolder
from ohlora.records import (aligned_batches, read_record, refuse_other_settings, scan_outputs, write_if_changed,
                            write_record, write_z_record)
from ohlora.tables import read_table
from stylegan.postprocess import require_finite, to_uint8
from stylegan_modified.controllable import ControllableGenerator
from stylegan_modified.labels import label_vector
from stylegan_modified.sweep_grid import sweep_grid

Z_NOISE_STREAM = 0
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

    def as_json(self) -> dict:
        record = asdict(self)
        if record['directions_sha256'] is None:  # the conditional models' records stay as they were
            del record['directions_sha256']
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
                    img_nos: list[int]) -> np.ndarray:
    """uint8 NHWC RGB images for z and the requested values (for the conditional generators: G(z, label) with
    upstream's inference settings, no truncation and the stored noise)."""
    image = generator.images(z, labels)
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


def resumable_images(files: GenerationFolder, settings: GenerationSettings) -> dict[str, int]:
    """The images already there, after making sure they were made with ``settings`` (else one-line error)."""
    existing = images_present(files)
    refuse_other_settings(read_settings(files), settings.as_json(), outputs=len(existing), folder=files.folder,
                          record_path=files.settings_json, noun='images',
                          remedy='choose another --outdir or move them away')
    return existing


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
                    names: dict | None = None) -> GenerationResult:
    """Write images 0..num-1 (each sweep value, for a sweep) that are not there yet; for a sweep also the grid.

    ``names`` (e.g. the weights and z file names) go into the settings record for the reader; they decide nothing.
    """
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    sweep = files.sweep
    if (sweep is None) != (sweep_values is None):
        raise PipelineError('a sweep needs both an attribute and its values')
    check_outputs(files)
    columns = [None] if sweep is None else list(sweep_values)
    existing = resumable_images(files, settings)
    items = [(n, value) for n in range(num) for value in columns]  # row-major: the grid's reading order
    todo = [(n, v) for n, v in items if files.image_name(n, v) not in existing]
    img_nos = sorted(set(existing.values()) | {n for n, _ in items})

    def record() -> None:  # after the first batch rendered: a refused batch leaves the folder as it was
        write_record(files.settings_json, settings.as_json(), **(names or {}))
        write_z_record(files.z_csv, img_nos, torch.stack([varied_latent(base_z, settings.seed, n, settings.variation)
                                                          for n in img_nos]).numpy())

    missing = set(todo)
    bar = tqdm(total=len(todo), desc=f'generating ({settings.model})', unit='img', disable=not progress)
    with BatchImageWriter(on_written=bar.update) as writer:  # JPEGs are written while the next batch renders
        for index, batch in enumerate(aligned_batches(items, set(items) - missing, batch_size)):
            z = torch.stack([varied_latent(base_z, settings.seed, n, settings.variation) for n, _ in batch])
            labels = torch.from_numpy(np.stack([label_vector({**values, **({sweep: v} if sweep else {})})
                                                for _, v in batch]))
            images = render_labelled(generator, z, labels, [n for n, _ in batch])
            if index == 0:
                record()
            writer.submit((files.image(n, v), rgb[:, :, ::-1]) for (n, v), rgb in zip(batch, images)
                          if (n, v) in missing)
    bar.close()
    if not todo:
        record()  # a finished rerun writes nothing: both records are written only when they change

    result = GenerationResult(written=len(todo), skipped=len(items) - len(todo), folder=files.folder)
    if sweep is not None:
        # The cells are the JPEGs read back one at a time as the grid is drawn (nothing of the run is kept in
        # memory), so a resumed run composes exactly the grid of an uninterrupted one.
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
        title = f'{settings.model}: {sweep} sweep, seed {settings.seed}; {others}'
        grid = sweep_grid(cell, rows, [_value_label(sweep, v) for v in columns], title)
        write_if_changed(files.grid, atomic.encode_image(files.grid.suffix, grid))
        result.grid = files.grid
    return result
