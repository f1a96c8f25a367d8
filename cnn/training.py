"""K-fold training of one property's CNNs (``--retrain``): seeded, bounded, resumable per fold.

Each fold trains a fresh model with AdamW and a summed BCE loss, validates after every epoch, and keeps the
weights of the epoch with the lowest validation BCE. Training stops ``patience`` epochs after the best epoch
or at the epoch cap. A fold whose best validation BCE is above the property's bound (gender 0.35, quality
0.13) is trained again from a fresh initialisation, at most ``max_attempts`` times (upstream: unbounded).

Learning rate (R10): upstream's ``CosineAnnealingLR(T_max=10)`` was stepped past T_max, so the LR was exactly 0
in epochs 10, 30, 50, ...; those epochs change nothing but count towards patience. The default here restarts
the cosine every 10 epochs instead (identical LRs in epochs 0-9, never 0); ``schedule='upstream'`` restores the
original curve.

Fold checkpoints go to a staging folder as each fold succeeds, with a record of the settings; an interrupted run
resumes at the next unfinished fold. Only when all folds have succeeded (with :func:`train_all`: all folds of
every property) do the files replace ``cnn/models/{property}_model_{fold}.pt``, so a failed or unfinished run never
leaves a mixed ensemble behind.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn
from torch.utils.data import SubsetRandomSampler
from tqdm import tqdm

from cnn.images import IMAGE_HW, ImageFiles, image_loader, to_unit_range
from cnn.properties import PropertySpec
from ohlora import atomic
from ohlora.constants import NUM_FOLDS
from ohlora.devices import item_generator
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.records import load_record, sha256_of
from ohlora.schedules import check_schedule, cosine_lr

logger = logging.getLogger(__name__)

EPOCH_LOG_COLUMNS = ['epoch', 'val_loss', 'val_accuracy', 'tp', 'tn', 'fp', 'fn', 'val_recall', 'val_precision',
                     'val_f1_score', 'val_auroc']
TRAIN_LOG_COLUMNS = ['fold_no', 'success', 'min_val_loss', 'total_epochs', 'best_epoch', 'elapsed_time (s)',
                     'val_loss_list']
INIT_STREAM, SAMPLER_STREAM = 30, 31  # item_generator streams: model init + dropout, batch order
ATTEMPT_STRIDE = 1000                 # attempt a of fold f draws from item index f * ATTEMPT_STRIDE + a


@dataclass(frozen=True)
class TrainingConfig:
    folds: int = NUM_FOLDS
    max_epochs: int = 200          # upstream had no cap; its longest fold ran 96 epochs (R8)
    patience: int = 20
    max_attempts: int = 5          # upstream: unbounded; every published fold passed on its logged attempt
    lr: float = 5e-5
    weight_decay: float = 0.01     # AdamW's default, as upstream
    train_batch_size: int = 16
    eval_batch_size: int = 4       # validation only; does not change the losses beyond float rounding
    schedule: str = 'restarts'     # or 'upstream' (R10)
    cosine_period: int = 10
    seed: int = 0
    success_bce: float | None = None  # None: the property's bound (gender 0.35, quality 0.13)

    def __post_init__(self):
        check_schedule(self.schedule)
        if min(self.folds - 1, self.max_epochs, self.patience, self.max_attempts) < 1:
            raise PipelineError('folds must be at least 2, and the epoch cap, patience and attempts at least 1')


def learning_rate(config: TrainingConfig, epoch: int) -> float:
    """LR of 0-based ``epoch``: the cosine of period ``cosine_period``, restarted or (upstream) mirrored through 0."""
    return cosine_lr(config.lr, epoch, config.cosine_period, config.schedule)


@dataclass(frozen=True)
class TrainingSamples:
    """The labelled images of one property: numbers, files and 0/1 labels (float32)."""
    img_nos: np.ndarray
    paths: list[Path]
    labels: np.ndarray
    image_size: tuple[int, int] | None = IMAGE_HW

    def fingerprint(self) -> str:
        """The labels and the images by content: a replaced image makes a rerun train again, not resume."""
        digest = hashlib.sha256(np.asarray(self.img_nos, dtype=np.int64).tobytes())
        digest.update(np.asarray(self.labels, dtype=np.float32).tobytes())
        for path in self.paths:
            try:
                digest.update(sha256_of(path).encode('ascii'))
            except OSError:
                digest.update(b'unreadable')
        return digest.hexdigest()[:16]


def fold_splits(labels: np.ndarray, folds: int, stratified: bool, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index arrays per fold: KFold, or StratifiedKFold on the label; seeded (R1)."""
    splitter_class = StratifiedKFold if stratified else KFold
    if len(labels) < folds:
        raise PipelineError(f'{len(labels)} labelled images cannot be split into {folds} folds')
    if stratified:
        smallest = int(np.bincount(np.asarray(labels, dtype=np.int64), minlength=2).min())
        if smallest < folds:
            raise PipelineError(f'stratified {folds}-fold training needs at least {folds} images of each label; '
                                f'the rarer label has {smallest}')
    splitter = splitter_class(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return [(train, val) for train, val in splitter.split(np.zeros(len(labels)), labels)]


def validation_metrics(outputs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Loss-independent metrics of one validation pass (the upstream epoch-log columns)."""
    predicted = outputs >= threshold
    positive = labels >= 0.5
    tp, tn = int(np.sum(predicted & positive)), int(np.sum(~predicted & ~positive))
    fp, fn = int(np.sum(predicted & ~positive)), int(np.sum(~predicted & positive))
    recall = tp / (tp + fn) if tp + fn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    auroc = float(roc_auc_score(positive, outputs)) if 0 < positive.sum() < len(positive) else float('nan')
    return {'val_accuracy': (tp + tn) / max(len(labels), 1), 'tp': tp, 'tn': tn, 'fp': fp, 'fn': fn,
            'val_recall': recall, 'val_precision': precision, 'val_f1_score': f1, 'val_auroc': auroc}


@dataclass
class AttemptResult:
    fold: int
    attempt: int
    success: bool
    min_val_loss: float
    total_epochs: int
    best_epoch: int
    elapsed: float
    val_losses: list[float]
    epoch_rows: list[dict]
    best_state: dict | None = field(default=None, repr=False)

    def log_row(self) -> dict:
        return {'fold_no': self.fold, 'success': self.success, 'min_val_loss': round(self.min_val_loss, 4),
                'total_epochs': self.total_epochs, 'best_epoch': self.best_epoch,
                'elapsed_time (s)': round(self.elapsed, 1), 'val_loss_list': [round(v, 4) for v in self.val_losses]}


class FoldTrainer:
    """Trains one attempt of one fold: the epoch loop, validation, early stopping and best-weight keeping."""

    def __init__(self, spec: PropertySpec, samples: TrainingSamples, config: TrainingConfig,
                 device: torch.device, workers: int = 0, progress: bool = True):
        self.spec, self.samples, self.config = spec, samples, config
        self.device, self.workers, self.progress = device, workers, progress
        self.dataset = ImageFiles(samples.img_nos, samples.paths, samples.labels, size=samples.image_size)
        self.unreadable: dict[int, str] = {}
        self.success_bce = spec.success_bce if config.success_bce is None else config.success_bce

    def _batches(self, loader):
        for batch in loader:
            self.unreadable.update(batch.failed)
            if batch.img_nos:
                yield (to_unit_range(batch.images.to(self.device, non_blocking=True)),
                       batch.labels.to(self.device, non_blocking=True))

    def _validate(self, model: nn.Module, loader) -> tuple[float, np.ndarray, np.ndarray]:
        model.eval()
        outputs, labels, loss_sum = [], [], 0.0
        with torch.no_grad():
            for images, target in self._batches(loader):
                out = model(images).reshape(-1)
                loss_sum += float(nn.functional.binary_cross_entropy(out, target, reduction='sum'))
                outputs.append(out.float().cpu().numpy())
                labels.append(target.cpu().numpy())
        if not outputs:
            raise PipelineError(f'no validation image of the {self.spec.name} CNN could be read')
        outputs, labels = np.concatenate(outputs), np.concatenate(labels)
        return loss_sum / len(outputs), outputs, labels

    def train_attempt(self, model_factory: Callable[[], nn.Module], fold: int, attempt: int,
            train_idx: np.ndarray, val_idx: np.ndarray) -> AttemptResult:
        config, item = self.config, fold * ATTEMPT_STRIDE + attempt
        init_seed = item_generator(config.seed, item, INIT_STREAM).initial_seed()
        sampler_rng = item_generator(config.seed, item, SAMPLER_STREAM)
        cuda = [self.device] if self.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=cuda):  # seeds init and dropout without disturbing the caller's RNG
            torch.manual_seed(init_seed)
            model = model_factory().to(self.device)
            return self._epochs(model, fold, attempt, train_idx, val_idx, sampler_rng)

    def _epochs(self, model, fold, attempt, train_idx, val_idx, sampler_rng) -> AttemptResult:
        config = self.config
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        train_loader = image_loader(self.dataset, config.train_batch_size, self.device, self.workers,
                                    sampler=SubsetRandomSampler(train_idx.tolist(), generator=sampler_rng),
                                    persistent=True)
        val_loader = image_loader(self.dataset, config.eval_batch_size, self.device, self.workers,
                                  sampler=val_idx.tolist(), persistent=True)
        started = time.perf_counter()
        best_loss, best_epoch, best_state = math.inf, -1, None
        val_losses, rows = [], []
        bar = tqdm(range(config.max_epochs), desc=f'{self.spec.name} fold {fold} attempt {attempt + 1}',
                   unit='epoch', disable=not self.progress, leave=False)
        for epoch in bar:
            for group in optimizer.param_groups:
                group['lr'] = learning_rate(config, epoch)
            model.train()
            for images, target in self._batches(train_loader):
                loss = nn.functional.binary_cross_entropy(model(images).reshape(-1), target, reduction='sum')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            val_loss, outputs, labels = self._validate(model, val_loader)
            if not math.isfinite(val_loss):
                raise PipelineError(f'{self.spec.name} fold {fold}: validation loss became {val_loss} in epoch {epoch}')
            val_losses.append(val_loss)
            rows.append({'epoch': epoch, 'val_loss': val_loss,
                         **validation_metrics(outputs, labels, self.spec.metric_threshold)})
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
            bar.set_postfix(val_bce=f'{val_loss:.4f}', best=f'{best_loss:.4f}@{best_epoch}')
            if epoch - best_epoch >= config.patience:
                break
        bar.close()
        return AttemptResult(fold, attempt, best_loss <= self.success_bce, best_loss, len(val_losses), best_epoch,
                             time.perf_counter() - started, val_losses, rows, best_state)


def _read_retrain_record(path: Path) -> dict | None:
    record = load_record(path)
    if record is None or not isinstance(record.get('attempts', []), list) \
            or not isinstance(record.get('finished', {}), dict):
        return None  # unusable: the retrain starts over
    return record


def _write_logs(layout: Layout, prop: str, attempts: list[dict], latest: AttemptResult | None) -> None:
    if latest is not None:
        frame = pd.DataFrame(latest.epoch_rows, columns=EPOCH_LOG_COLUMNS).round(4)
        atomic.write_csv(layout.cnn_epoch_log(prop, latest.fold), frame)
    atomic.write_csv(layout.cnn_train_log(prop), pd.DataFrame(attempts, columns=TRAIN_LOG_COLUMNS))


def training_settings(spec: PropertySpec, samples: TrainingSamples, config: TrainingConfig,
                      model_factory: Callable[[], nn.Module]) -> dict:
    """Everything a resumed run must share with the interrupted one (plain types, no paths)."""
    name = getattr(model_factory, '__qualname__', type(model_factory).__name__)
    # The attempt cap changes no finished fold (attempt a of fold f always draws the same seeds), so raising
    # --max-attempts after a failure resumes instead of starting over.
    shared = {k: v for k, v in asdict(config).items() if k != 'max_attempts'}
    return {'property': spec.name, 'model': name, 'labels': samples.fingerprint(), 'images': len(samples.img_nos),
            **shared, 'success_bce': spec.success_bce if config.success_bce is None else config.success_bce}


@dataclass
class TrainingOutcome:
    trained: list[int]           # folds trained in this run
    resumed: list[int]           # folds taken from an interrupted run
    attempts: list[dict]         # per-attempt log rows
    unreadable: dict[int, str]   # labelled images that could not be read (left out of training)
    up_to_date: bool = False     # the installed models already came from these settings


def train_property(spec: PropertySpec, samples: TrainingSamples, layout: Layout, config: TrainingConfig,
                   model_factory: Callable[[], nn.Module], device: torch.device, workers: int = 0,
                   progress: bool = True, install_models: bool = True) -> TrainingOutcome:
    """Train all folds of ``spec`` (resuming finished ones), then install them into ``cnn/models/`` (or leave them
    staged for :func:`install_trained` when ``install_models`` is False)."""
    settings = training_settings(spec, samples, config, model_factory)
    record_path = layout.cnn_retrain_record(spec.name)
    record = _read_retrain_record(record_path)
    if record is not None and record.get('settings') == settings and record.get('installed'):
        if all(layout.cnn_model(spec.name, f).is_file() and sha256_of(layout.cnn_model(spec.name, f)) == digest
               for f, digest in enumerate(record['installed'])):
            return TrainingOutcome([], [], record['attempts'], {}, up_to_date=True)
    if record is None or record.get('settings') != settings or record.get('installed'):
        for fold in range(config.folds):  # an earlier run with other settings: its folds cannot be reused
            staged = layout.cnn_staged_model(spec.name, fold)
            if staged.exists():
                staged.unlink()
        record = {'settings': settings, 'attempts': [], 'finished': {}}
        atomic.write_json(record_path, record)
    record['finished'] = {k: v for k, v in record['finished'].items() if _fold_ready(layout, spec.name, int(k), v)}
    resumed = sorted(int(k) for k in record['finished'])
    if resumed:
        logger.info('%s: resuming an interrupted --retrain; folds %s are already trained', spec.name, resumed)

    splits = fold_splits(samples.labels, config.folds, spec.stratified, config.seed)
    trainer = FoldTrainer(spec, samples, config, device, workers, progress)
    trained = []
    for fold, (train_idx, val_idx) in enumerate(splits):
        if fold in resumed:
            continue
        for attempt in range(config.max_attempts):
            result = trainer.train_attempt(model_factory, fold, attempt, train_idx, val_idx)
            record['attempts'].append(result.log_row())
            verdict = 'succeeded' if result.success else f'failed (> {trainer.success_bce})'
            logger.info('%s fold %d attempt %d: best validation BCE %.4f at epoch %d of %d, %s', spec.name, fold,
                        attempt + 1, result.min_val_loss, result.best_epoch, result.total_epochs, verdict)
            if result.success:
                staged = layout.cnn_staged_model(spec.name, fold)
                atomic.torch_save(staged, result.best_state)
                record['finished'][str(fold)] = sha256_of(staged)
            _write_logs(layout, spec.name, record['attempts'], result)
            atomic.write_json(record_path, record)
            if result.success:
                trained.append(fold)
                break
        else:
            raise PipelineError(f'{spec.name} fold {fold} failed all {config.max_attempts} attempts: the best '
                                f'validation BCE stayed above {trainer.success_bce} (see '
                                f'{layout.relative(layout.cnn_train_log(spec.name))}); check the labels or '
                                'raise --max-attempts / --max-epochs')
    if install_models:
        install(layout, spec.name, config.folds, record, record_path)
    return TrainingOutcome(trained, resumed, record['attempts'], dict(trainer.unreadable))


def _fold_ready(layout: Layout, prop: str, fold: int, digest: str) -> bool:
    """A finished fold's model is staged, or already moved into place by an install that was interrupted."""
    for path in (layout.cnn_staged_model(prop, fold), layout.cnn_model(prop, fold)):
        if path.is_file() and sha256_of(path) == digest:
            return True
    return False


def install(layout: Layout, prop: str, folds: int, record: dict, record_path: Path) -> None:
    """Move the staged fold models over ``cnn/models/{prop}_model_{fold}.pt`` (each move atomic)."""
    layout.cnn_models_dir.mkdir(parents=True, exist_ok=True)
    for fold in range(folds):
        staged = layout.cnn_staged_model(prop, fold)
        if staged.is_file():  # else moved already by an install that was interrupted (checked by digest)
            os.replace(staged, layout.cnn_model(prop, fold))
    record['installed'] = [record['finished'][str(fold)] for fold in range(folds)]
    atomic.write_json(record_path, record)


def install_trained(layout: Layout, prop: str, folds: int) -> None:
    """Install the staged folds of a finished :func:`train_property` run (nothing if already installed)."""
    record_path = layout.cnn_retrain_record(prop)
    record = _read_retrain_record(record_path)
    if record is None or record.get('installed'):
        return
    if set(record.get('finished', {})) != {str(fold) for fold in range(folds)}:
        raise PipelineError(f'the {prop} --retrain has not finished every fold; rerun it to resume')
    install(layout, prop, folds, record, record_path)


def train_all(jobs: list[tuple[PropertySpec, TrainingSamples, Callable[[], nn.Module]]], layout: Layout,
              config: TrainingConfig, device: torch.device, workers: int = 0,
              progress: bool = True) -> dict[str, TrainingOutcome]:
    """Train every property's folds, then install them: ``cnn/models/`` changes only when every fold of every
    property has succeeded, so a failed or interrupted --retrain leaves the installed ensembles as they were."""
    outcomes = {spec.name: train_property(spec, samples, layout, config, factory, device, workers, progress,
                                          install_models=False)
                for spec, samples, factory in jobs}
    for spec, _, _ in jobs:
        install_trained(layout, spec.name, config.folds)
    return outcomes
