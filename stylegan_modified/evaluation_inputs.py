"""What the evaluation feeds a generator: the z vectors (seeded or from a CSV) and the label grid per z."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ohlora.cli import check_float
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES
from ohlora.tables import read_table
from stylegan_modified.attribute_metrics import V3_TEST_GRID, grid_labels

# item_generator stream of the evaluation's z draws: its own, so that the evaluation's random z never coincide with
# stage 1's or the direction sampler's z of the same seed (stream 0, stylegan.sampling.Z_STREAM) and a fit is never
# evaluated on the z it was fitted on.
Z_STREAM = 90


def seeded_z(seed: int, num: int, z_dim: int) -> np.ndarray:
    """float32 (num, z_dim): z_i ~ N(0, I) from an RNG that depends only on (seed, i), never on batches."""
    if num < 1:
        raise PipelineError(f'--num must be at least 1, got {num}')
    return np.stack([torch.randn(z_dim, generator=item_generator(seed, i, Z_STREAM)).numpy() for i in range(num)])


def read_z_rows(path: str | Path, z_dim: int) -> np.ndarray:
    """float32 (rows, z_dim) of a CSV with the header 0,1,...,n-1 and one z per row (e.g. test_z_vector_0005.csv).

    Values are read as float64 and cast, as stage 6 casts its CSV z.
    """
    path = Path(path)
    frame = read_table(path, (), 'z vector CSV')
    if [str(c) for c in frame.columns] != [str(k) for k in range(frame.shape[1])]:
        raise PipelineError(f'{path} is not a z vector CSV: its header must be 0,1,...,n-1 '
                            f'(it starts {",".join(map(str, frame.columns[:4]))})')
    if frame.shape[1] != z_dim:
        raise PipelineError(f'{path} holds z of {frame.shape[1]} values, but the generator takes z of {z_dim}')
    try:
        z = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise PipelineError(f'{path} has non-numeric values (z vector CSV)') from None
    with np.errstate(over='ignore'):  # a value beyond float32 becomes inf here and is refused below
        z32 = z.astype(np.float32)
    broken = ~(np.isfinite(z) & np.isfinite(z32)).all(axis=1)
    if broken.any():
        row = int(np.flatnonzero(broken)[0])
        raise PipelineError(f'{path} has NaN or infinite values, or values beyond float32 (z vector CSV, data row '
                            f'{row})')
    return z32


def z_digest(z: np.ndarray) -> str:
    """Short SHA-256 of one float32 z: what a run folder remembers of each z."""
    return hashlib.sha256(np.ascontiguousarray(z, dtype='<f4').tobytes()).hexdigest()[:16]


def _number(text: str, spec: str) -> float:
    try:
        value = float(text) + 0.0  # -0.0 becomes 0.0
    except ValueError:
        raise PipelineError(f'--grid {spec}: {text!r} is not a number') from None
    # the range stage 6 allows for its attribute values: beyond it a float32 label overflows into NaN images
    return check_float(f'--grid {spec}:', value)


def parse_grid(specs: Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    """``['mouth=-1.2,0,1.6', 'eyes=-1.8,1.8']`` -> the label grid, first attribute varying slowest.

    None gives upstream's v3 test grid. An attribute given one value is held there; the grid must vary at
    least one attribute.
    """
    if not specs:
        return dict(V3_TEST_GRID)
    grid: dict[str, tuple[float, ...]] = {}
    for spec in specs:
        name, sep, values = spec.partition('=')
        attribute = name.strip().replace('-', '_')
        if not sep or not values.strip():
            raise PipelineError(f'--grid {spec!r} is not ATTR=V1,V2,... (e.g. --grid mouth=-1.2,0,1.6)')
        if attribute not in PROPERTY_NAMES:
            raise PipelineError(f'--grid {spec}: unknown attribute {name.strip()!r}; the attributes are '
                                f'{", ".join(PROPERTY_NAMES)}')
        if attribute in grid:
            raise PipelineError(f'--grid names {attribute} twice')
        numbers = tuple(_number(part.strip(), spec) for part in values.split(',') if part.strip())
        if len(set(numbers)) != len(numbers):
            raise PipelineError(f'--grid {spec} lists a value twice')
        grid[attribute] = numbers
    if not swept_attributes(grid):
        raise PipelineError('--grid varies no attribute: give at least one attribute two or more values')
    return grid


def swept_attributes(grid: dict[str, Sequence[float]]) -> tuple[str, ...]:
    """The grid's attributes that take two or more values, in grid order: the ones r and MAE can be judged on."""
    return tuple(a for a, values in grid.items() if len(values) >= 2)


def grid_warnings(grid: dict[str, Sequence[float]], model: str, trained: Sequence[str]) -> list[str]:
    """One line per grid attribute with a non-zero value that the model was never trained on (as stage 6 warns)."""
    lines = []
    for attribute, values in grid.items():
        if attribute not in trained and any(v != 0.0 for v in values):
            lines.append(f'--grid {attribute}: {model} was never trained on {attribute} (only {", ".join(trained)}), '
                         'so its values change the image in no controlled way; its r and MAE show what an '
                         'unlearned input does')
    return lines


def requested_values(grid: dict[str, Sequence[float]]) -> np.ndarray:
    """float64 (L, 7): the grid's values exactly as given, in the order of :func:`grid_labels`, whose float32
    labels are what the generator receives (-1.8 there is -1.7999999523...)."""
    labels = grid_labels(grid)
    requested = np.zeros(labels.shape, dtype=np.float64)
    columns = [PROPERTY_NAMES.index(a) for a in grid]
    requested[:, columns] = np.array(list(itertools.product(*grid.values())), dtype=np.float64).reshape(len(labels), -1)
    return requested
