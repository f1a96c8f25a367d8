"""The v3 per-epoch test (PIPELINE.md §7.4, steps 1-6): can the generator of this epoch be steered?

1. During the epoch, :class:`MuLogvarHistory` keeps mu[0] and logvar[0] (the first sample of each batch) of
   the last 100 batches. The last ``num_z`` rows give the test z's, z = mu + eps * exp(logvar / 2), with eps
   drawn from (seed, epoch) only, so the test is reproducible and draws nothing from the training RNGs.
2. Each z is combined with every label of the grid (default: upstream's 50, mouth outer, eyes, pose inner;
   the other label entries 0).
3. The generator renders them in batches (eval mode, no_grad, stored noise, no truncation); the property CNN
   scores each image; scores are rounded to 4 decimals; per z, Pearson r, MAE and MSE between requested and
   measured eyes, mouth and pose (:func:`stylegan_modified.attribute_metrics.compare`; r = 0 when either
   side does not vary, never NaN).
4. A z passes the rule (default :data:`~stylegan_modified.attribute_metrics.UPSTREAM_V3_RULE`).
5. The best passing z (:func:`~stylegan_modified.attribute_metrics.best_passing`) is what the trainer saves
   with the epoch's checkpoint.
6. The files of :class:`ohlora.layout.V3EpochTestFolder`: the stored mu / logvar rows (4 decimals), the test
   z's (full precision, header 0..n-1: row k is exactly the z a test_z_vector CSV of z k holds), per z its
   images and scores, ``result_each_z.csv``, and ``num_random`` images of z ~ N(0, I) and a random label
   (N(0, I), background_std 0) with their gender and property scores.

The scorers are plain callables (images in [-1, 1] -> (N, 7) property scores / (N, 1) gender scores), so a
test can plug in a known measurement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ohlora import atomic
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES, V3EpochTestFolder
from stylegan.postprocess import to_uint8
from stylegan_modified.attribute_metrics import (CONTROLLED_ATTRIBUTES, SCORE_DECIMALS, UPSTREAM_V3_RULE,
                                                 V3_TEST_GRID, AttributeMetrics, PassRule, best_passing, compare,
                                                 grid_labels)
from stylegan_modified.cvae_encoder import reparameterize

HISTORY_SIZE = 100          # batches whose first mu / logvar are kept (upstream: the last 100 of the epoch)
EPSILON_STREAM = 70         # item_generator streams: the test z's eps, the random images' z and labels
RANDOM_Z_STREAM = 71
RANDOM_LABEL_STREAM = 72
RANDOM_ZERO_LABELS = ('background_std',)  # upstream sets label index 6 of the random images to 0

Scorer = Callable[[torch.Tensor], torch.Tensor]


class MuLogvarHistory:
    """mu[0] and logvar[0] of the last ``size`` batches of the epoch in progress (CPU float32 rows)."""

    def __init__(self, size: int = HISTORY_SIZE):
        self.size = size
        self.mus: list[torch.Tensor] = []
        self.logvars: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.mus)

    def add(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Keep the first sample's row of this batch's (N, z) mu and logvar."""
        self.mus.append(mu[0].detach().to('cpu', torch.float32, copy=True))
        self.logvars.append(logvar[0].detach().to('cpu', torch.float32, copy=True))
        del self.mus[:-self.size], self.logvars[:-self.size]

    def clear(self) -> None:
        self.mus, self.logvars = [], []

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.mus:
            raise ValueError('the mu / logvar history is empty')
        return torch.stack(self.mus), torch.stack(self.logvars)

    def state_dict(self) -> dict:
        """For the resume record (tensors only)."""
        if not self.mus:
            return {'mu': torch.zeros(0), 'logvar': torch.zeros(0)}
        mu, logvar = self.tensors()
        return {'mu': mu, 'logvar': logvar}

    def load_state_dict(self, state: dict) -> None:
        mu, logvar = state['mu'], state['logvar']
        self.mus = [row.clone() for row in mu] if mu.ndim == 2 else []
        self.logvars = [row.clone() for row in logvar] if logvar.ndim == 2 else []


@dataclass(frozen=True)
class EpochTestSettings:
    num_z: int = 30
    grid: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(V3_TEST_GRID))
    rule: PassRule = UPSTREAM_V3_RULE
    num_random: int = 30
    batch_size: int = 32      # images per generator / CNN call
    seed: int = 0


@dataclass
class EpochTestResult:
    epoch: int
    zs: torch.Tensor               # (Z, z_dim) float32, CPU
    labels: np.ndarray             # (n, 7) float32, the grid
    scores: np.ndarray             # (Z, n, 7) measured, rounded to 4 decimals
    metrics: AttributeMetrics      # (Z, 3): eyes, mouth, pose
    passed: np.ndarray             # (Z,) bool
    best: int | None               # index of the best passing z
    random_labels: np.ndarray      # (R, 7)
    random_scores: np.ndarray      # (R, 7), rounded
    random_gender: np.ndarray      # (R,), rounded

    @property
    def num_passed(self) -> int:
        return int(self.passed.sum())

    @property
    def best_z(self) -> torch.Tensor | None:
        return None if self.best is None else self.zs[self.best]


def epoch_test_latents(history: MuLogvarHistory, num_z: int, seed: int, epoch: int) -> torch.Tensor:
    """The last ``num_z`` stored rows (fewer if the epoch had fewer batches) as z = mu + eps * sigma."""
    mu, logvar = history.tensors()
    mu, logvar = mu[-num_z:], logvar[-num_z:]
    eps = torch.randn(mu.shape, generator=item_generator(seed, epoch, EPSILON_STREAM))
    return reparameterize(mu, logvar, eps)


def random_inputs(count: int, z_dim: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(count, z_dim, generator=item_generator(seed, epoch, RANDOM_Z_STREAM))
    labels = torch.randn(count, len(PROPERTY_NAMES), generator=item_generator(seed, epoch, RANDOM_LABEL_STREAM))
    labels[:, [PROPERTY_NAMES.index(name) for name in RANDOM_ZERO_LABELS]] = 0.0
    return z, labels


def _vector_frame(rows: np.ndarray, decimals: int | None = None) -> pd.DataFrame:
    """Rows under the header 0..n-1 (the z vector CSV format)."""
    rows = np.asarray(rows, dtype=np.float64)
    if decimals is not None:
        rows = np.round(rows, decimals)
    return pd.DataFrame(rows, columns=[str(k) for k in range(rows.shape[1])])


def z_csv_bytes(z: torch.Tensor) -> bytes:
    """One z as the one-row CSV stage 6 reads (header 0..n-1); the float32 values survive the round trip exactly."""
    return _vector_frame(z.detach().cpu().double().numpy()[None]).to_csv(index=False, lineterminator='\n').encode()


def _score_frame(labels: np.ndarray, scores: np.ndarray, gender: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({'idx': np.arange(len(labels))})
    for k, name in enumerate(PROPERTY_NAMES):
        frame[f'{name}_label'] = np.asarray(labels[:, k], dtype=np.float64).round(SCORE_DECIMALS)
    if gender is not None:
        frame['gender_score'] = gender
    for k, name in enumerate(PROPERTY_NAMES):
        frame[f'{name}_score'] = scores[:, k]
    return frame


def result_each_z(result: EpochTestResult) -> pd.DataFrame:
    """z_idx, passed (O/X, as upstream), then r ('corr'), MSE and MAE of eyes, mouth and pose."""
    frame = pd.DataFrame({'z_idx': np.arange(len(result.passed)),
                          'passed': np.where(result.passed, 'O', 'X')})
    for metric, suffix in (('r', 'corr'), ('mse', 'mse'), ('mae', 'mae')):
        for attribute in result.metrics.attributes:
            frame[f'{attribute}_{suffix}'] = result.metrics.get(metric, attribute)
    return frame


def _write_jpegs(paths, images: torch.Tensor) -> None:
    for path, rgb in zip(paths, to_uint8(images)):
        atomic.write_image(path, np.ascontiguousarray(rgb[:, :, ::-1]))


class _ModeSwitch:
    """Eval mode for the generator during the test, its previous mode afterwards."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _render(generator: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return generator(z, labels, trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image']


@torch.no_grad()
def run_epoch_test(generator: torch.nn.Module, property_scorer: Scorer, gender_scorer: Scorer,
                   history: MuLogvarHistory, epoch: int, settings: EpochTestSettings,
                   folder: V3EpochTestFolder | None = None, progress: bool = False) -> EpochTestResult:
    """Steps 1-6 of the module docstring; ``folder`` None measures without writing files."""
    device = next(generator.parameters()).device
    zs = epoch_test_latents(history, settings.num_z, settings.seed, epoch)
    labels = grid_labels(settings.grid)
    num_z, num_labels = zs.shape[0], labels.shape[0]
    pairs = [(k, j) for k in range(num_z) for j in range(num_labels)]
    scores = np.zeros((num_z, num_labels, len(PROPERTY_NAMES)), dtype=np.float64)
    label_tensor = torch.from_numpy(labels)
    bar = tqdm(total=len(pairs) + settings.num_random, desc=f'epoch {epoch} test', unit='img', disable=not progress)
    with _ModeSwitch(generator):
        for start in range(0, len(pairs), settings.batch_size):
            chunk = pairs[start:start + settings.batch_size]
            z_rows = torch.tensor([k for k, _ in chunk])
            label_rows = torch.tensor([j for _, j in chunk])
            images = _render(generator, zs[z_rows].to(device), label_tensor[label_rows].to(device))
            measured = property_scorer(images).detach().to('cpu', torch.float64).numpy()
            scores[z_rows.numpy(), label_rows.numpy()] = np.round(measured, SCORE_DECIMALS)
            if folder is not None:
                _write_jpegs([folder.z_image(k, j) for k, j in chunk], images)
            bar.update(len(chunk))

        random_z, random_labels = random_inputs(settings.num_random, zs.shape[1], settings.seed, epoch)
        random_scores = np.zeros((settings.num_random, len(PROPERTY_NAMES)))
        random_gender = np.zeros(settings.num_random)
        for start in range(0, settings.num_random, settings.batch_size):
            rows = slice(start, start + settings.batch_size)
            images = _render(generator, random_z[rows].to(device), random_labels[rows].to(device))
            random_scores[rows] = np.round(property_scorer(images).detach().to('cpu', torch.float64).numpy(),
                                           SCORE_DECIMALS)
            random_gender[rows] = np.round(gender_scorer(images).detach().to('cpu', torch.float64).numpy()
                                           .reshape(-1), SCORE_DECIMALS)
            if folder is not None:
                _write_jpegs([folder.random_image(i) for i in range(start, start + images.shape[0])], images)
            bar.update(images.shape[0])
    bar.close()

    # the requested values as given (float64), not their float32 copies fed to the generator
    metrics = compare(grid_labels(settings.grid, np.float64), scores, CONTROLLED_ATTRIBUTES, decimals=SCORE_DECIMALS)
    passed = np.asarray(settings.rule.passes(metrics), dtype=bool).reshape(num_z)
    result = EpochTestResult(epoch, zs, labels, scores, metrics, passed, best_passing(metrics, passed),
                             random_labels.numpy(), random_scores, random_gender)
    if folder is not None:
        write_epoch_files(result, history, folder)
    return result


def write_epoch_files(result: EpochTestResult, history: MuLogvarHistory, folder: V3EpochTestFolder) -> None:
    """The CSVs of step 6 (the images are written while they are rendered)."""
    mu, logvar = history.tensors()
    atomic.write_csv(folder.mus_csv, _vector_frame(mu.numpy(), SCORE_DECIMALS))
    atomic.write_csv(folder.log_vars_csv, _vector_frame(logvar.numpy(), SCORE_DECIMALS))
    atomic.write_csv(folder.zs_csv, _vector_frame(result.zs.double().numpy()))
    for k in range(len(result.passed)):
        atomic.write_csv(folder.z_result_csv(k), _score_frame(result.labels, result.scores[k]))
    atomic.write_csv(folder.result_each_z_csv, result_each_z(result))
    if len(result.random_labels):
        atomic.write_csv(folder.random_result_csv, _score_frame(result.random_labels, result.random_scores,
                                                                result.random_gender))


# --- the test's options as text (the command line) ---
def grid_text(grid: Mapping[str, tuple[float, ...]]) -> str:
    return ';'.join(f'{name}=' + ','.join(f'{v:g}' for v in values) for name, values in grid.items())


def parse_grid(text: str, option: str = '--test-grid') -> dict[str, list[float]]:
    """``'mouth=-1.2,0,1.6;eyes=-1.8,1.8;pose=0,1.2'`` -> ``{'mouth': [...], ...}`` (first attribute outermost)."""
    grid: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(';'))):
        name, sep, values = part.partition('=')
        name = name.strip().replace('-', '_')
        if not sep or name not in PROPERTY_NAMES:
            raise PipelineError(f'{option} {text!r}: each part is ATTRIBUTE=V1,V2,... with an attribute of '
                                f'{", ".join(PROPERTY_NAMES)} (got {part!r})')
        if name in grid:
            raise PipelineError(f'{option} {text!r} names {name} twice')
        try:
            grid[name] = [float(v) + 0.0 for v in values.split(',') if v.strip()]
        except ValueError:
            raise PipelineError(f'{option} {text!r}: the values of {name} are not numbers') from None
    try:
        labels = grid_labels(grid)
    except ValueError as exc:
        raise PipelineError(f'{option} {text!r}: {exc}') from None
    if len(labels) < 2:
        raise PipelineError(f'{option} {text!r}: gives {len(labels)} label; correlating requested and measured '
                            'values needs at least 2')
    return grid


def parse_attribute_values(text: str, option: str, allow_none: bool = False) -> dict[str, float | None]:
    """``'eyes=0.7,mouth=0.8'`` -> ``{'eyes': 0.7, 'mouth': 0.8}``; ``none`` (if allowed) drops a bound."""
    values: dict[str, float | None] = {}
    for part in filter(None, (p.strip() for p in text.split(','))):
        name, sep, value = part.partition('=')
        name = name.strip().replace('-', '_')
        if not sep or name not in CONTROLLED_ATTRIBUTES:
            raise PipelineError(f'{option} {text!r}: each part is ATTRIBUTE=VALUE with an attribute of '
                                f'{", ".join(CONTROLLED_ATTRIBUTES)} (got {part!r})')
        if allow_none and value.strip().lower() == 'none':
            values[name] = None
            continue
        try:
            values[name] = float(value)
        except ValueError:
            raise PipelineError(f'{option} {text!r}: {value.strip()!r} is not a number') from None
        if not np.isfinite(values[name]):
            raise PipelineError(f'{option} {text!r}: {name} must be a finite number')
    return values
