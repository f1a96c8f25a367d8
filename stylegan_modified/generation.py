"""Stage 6: Oh-LoRA images with chosen attribute values from a fine-tuned conditional generator (PIPELINE.md §8).

Image *i* uses z_i = z_csv + variation * N(0, I), the noise drawn in float64 from an RNG that depends only on
(seed, i), then cast to float32 (upstream adds unseeded ``np.random.randn`` to the float64 CSV vector); image 0
is the CSV z itself. Every image of a run shares one label. The generator runs in eval mode with no truncation
and its stored noise maps, as upstream's ``G_kwargs_val``. Images are GenForce's uint8 conversion written as
OpenCV JPEGs (quality 95), as upstream.

A sweep renders every z for each value of one attribute (the other attributes as given), writes those images
and one labelled grid (rows = z, columns = values). Each output folder records its settings; a rerun with the
same settings skips the images already there, other settings are refused instead of mixing two runs.
"""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES, GenerationFolder
from ohlora.tables import read_table
from stylegan.postprocess import to_uint8
from stylegan_modified.labels import label_vector
from stylegan_modified.sweep_grid import sweep_grid

Z_NOISE_STREAM = 0
Z_RULE = 'z_i = float32(z_csv + variation * N(0, I) drawn in float64 from (seed, i)); z_0 = z_csv'


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the pixels of an image of a folder; a resumed run must use the same."""
    model: str
    weights_file: str
    weights_bytes: int
    z_file: str
    z_sha256: str          # of the CSV z as float64, so an edited CSV of the same name is noticed
    seed: int
    variation: float
    label: dict = field(default_factory=dict)   # for a sweep, the swept attribute is None (it varies)
    sweep: str | None = None
    z_rule: str = Z_RULE

    def as_json(self) -> dict:
        return asdict(self)


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
    if not np.isfinite(z).all():
        raise PipelineError(f'{path} has NaN or infinite values (z vector CSV)')
    return z


def z_digest(z: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(z, dtype='<f8').tobytes()).hexdigest()[:16]


def image_latent(base_z: np.ndarray, seed: int, img_no: int, variation: float) -> torch.Tensor:
    """float32 z of image ``img_no``: the CSV z for image 0, else CSV z + variation * N(0, I) from (seed, img_no)."""
    z = torch.from_numpy(np.asarray(base_z, dtype=np.float64))
    if img_no > 0 and variation != 0:
        noise = torch.randn(z.shape[0], generator=item_generator(seed, img_no, Z_NOISE_STREAM), dtype=torch.float64)
        z = z + variation * noise
    return z.to(torch.float32)


@torch.inference_mode()
def synthesize(generator, z: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """uint8 NHWC RGB images of G(z, label) with upstream's inference settings (no truncation, stored noise)."""
    device = next(generator.parameters()).device
    image = generator(z.to(device), labels.to(device), trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image']
    return to_uint8(image)


def _read_settings(files: GenerationFolder) -> dict | None:
    path = files.settings_json
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise PipelineError(f'{path} is not a settings record of this stage; delete it together with the images it '
                            'describes, or choose another --outdir')
    return recorded


def existing_images(files: GenerationFolder) -> dict[str, int]:
    """{file name: image number} of the images of this kind already in the folder."""
    if not files.folder.is_dir():
        return {}
    pattern = re.compile(r'(\d{6})\.jpg' if files.sweep is None else rf'(\d{{6}})_{re.escape(files.sweep)}_.+\.jpg')
    found = {}
    for path in files.folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found[path.name] = int(match.group(1))
    return found


def _flat(settings: dict) -> dict:
    """Settings with the label spread out ('label.eyes': 1.8), so a message names only what changed."""
    flat = {k: v for k, v in settings.items() if k != 'label'}
    label = settings.get('label')
    flat.update({f'label.{k}': v for k, v in label.items()} if isinstance(label, dict) else {'label': label})
    return flat


def check_resumable(files: GenerationFolder, settings: GenerationSettings) -> dict[str, int]:
    """The images already there, after making sure they were made with ``settings`` (else one-line error)."""
    existing = existing_images(files)
    recorded = _read_settings(files)
    if existing and recorded is None:
        raise PipelineError(f'{files.folder} already holds {len(existing)} images but no {files.settings_json.name} '
                            'says how they were made; choose another --outdir or move them away')
    if existing and recorded != settings.as_json():
        before, after = _flat(recorded), _flat(settings.as_json())
        changed = [k for k in after if before.get(k) != after[k]] or sorted(set(before) - set(after))
        detail = ', '.join(f'{k} {before.get(k)!r} -> {after.get(k)!r}' for k in changed[:3])
        raise PipelineError(f'{files.folder} holds images made with other settings ({detail}); rerun with the same '
                            'settings, or choose another --outdir')
    return existing


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write unless the file already holds exactly these bytes (a finished rerun writes nothing)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic.write_bytes(path, data)
    return True


def _encode(suffix: str, bgr: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(suffix, bgr)
    if not ok:
        raise OSError(f'OpenCV could not encode a {suffix} image')
    return encoded.tobytes()


def write_z_record(files: GenerationFolder, base_z: np.ndarray, seed: int, variation: float,
                   img_nos: list[int]) -> bool:
    """``z_vectors.csv``: img_no and the float32 z of every image in the folder (R1: every sampled z is recorded)."""
    z = torch.stack([image_latent(base_z, seed, n, variation) for n in img_nos]).numpy()
    frame = pd.DataFrame(z, columns=[f'z{k}' for k in range(z.shape[1])])
    frame.insert(0, 'img_no', img_nos)
    return _write_if_changed(files.z_csv, frame.to_csv(index=False, lineterminator='\n').encode('utf-8'))


@dataclass
class GenerationResult:
    written: int
    skipped: int
    grid: Path | None = None
    folder: Path | None = None


def _value_label(attribute: str, value: float) -> str:
    return f'{attribute} = {value:g}'


def generate(generator, files: GenerationFolder, settings: GenerationSettings, base_z: np.ndarray,
             values: dict[str, float], num: int, batch_size: int, sweep_values: list[float] | None = None,
             progress: bool = True) -> GenerationResult:
    """Write images 0..num-1 (each sweep value, for a sweep) that are not there yet; for a sweep also the grid."""
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    sweep = files.sweep
    if (sweep is None) != (sweep_values is None):
        raise PipelineError('a sweep needs both an attribute and its values')
    columns = [None] if sweep is None else list(sweep_values)
    existing = check_resumable(files, settings)
    items = [(n, value) for n in range(num) for value in columns]  # row-major: the grid's reading order
    todo = [(n, v) for n, v in items if files.image_name(n, v) not in existing]
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f'cannot write into {files.folder}: {exc.strerror or exc}') from None
    _write_if_changed(files.settings_json, (json.dumps(settings.as_json(), indent=2, sort_keys=True) + '\n').encode())

    encoded: dict[tuple[int, float | None], bytes] = {}
    bar = tqdm(total=len(todo), desc=f'generating ({settings.model})', unit='img', disable=not progress)
    with ThreadPoolExecutor(max_workers=4) as pool:  # JPEG encoding releases the GIL
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            z = torch.stack([image_latent(base_z, settings.seed, n, settings.variation) for n, _ in batch])
            labels = torch.from_numpy(np.stack([label_vector({**values, **({sweep: v} if sweep else {})})
                                                for _, v in batch]))
            images = synthesize(generator, z, labels)
            jpegs = list(pool.map(lambda rgb: _encode('.jpg', rgb[:, :, ::-1]), images))
            for (n, v), data in zip(batch, jpegs):
                atomic.write_bytes(files.image(n, v), data)
                encoded[(n, v)] = data
            bar.update(len(batch))
    bar.close()

    img_nos = sorted(set(existing.values()) | {n for n, _ in items})
    write_z_record(files, base_z, settings.seed, settings.variation, img_nos)
    result = GenerationResult(written=len(todo), skipped=len(items) - len(todo), folder=files.folder)
    if sweep is not None:
        # Cells are the decoded JPEGs, so a resumed run composes exactly the grid of an uninterrupted one.
        def cell(n, v):
            data = encoded.get((n, v)) or files.image(n, v).read_bytes()
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

        cells = [[cell(n, v) for v in columns] for n in range(num)]
        rows = ['z 0 (CSV)' if n == 0 else f'z {n}' for n in range(num)]
        others = ', '.join(f'{k} {values.get(k, 0.0):g}' for k in PROPERTY_NAMES if k != sweep)
        title = f'{settings.model}: {sweep} sweep, seed {settings.seed}; {others}'
        grid = sweep_grid(cells, rows, [_value_label(sweep, v) for v in columns], title)
        _write_if_changed(files.grid, _encode('.png', grid))
        result.grid = files.grid
    return result
