"""Stage 5 v2, phase 1: the property-score CNN trained on the algorithm-2 scores (PIPELINE.md §7.3).

The data are the filtered images with the seven z-scores of ``all_scores_v2.csv``; a seeded 90/10 split
(``size * 9 // 10`` training images: 4,232 / 471 for upstream's 4,703) replaces upstream's unseeded
``random_split``. Each epoch trains on the training part in an order drawn from (seed, epoch) in batches of 16
with the mean-squared error over all seven outputs, AdamW (lr 5e-5, weight decay 0.01) and a cosine LR per
epoch (period 10, restarted so that no epoch has LR 0; ``--compat upstream``: upstream's
``CosineAnnealingLR(T_max=10)`` curve with LR 0 in epochs 10, 30, ..., R10). Then the validation part is scored
in eval mode:

* ``valid_loss``: the MSE over all seven outputs and all validation images (independent of the validation
  batch size, unlike a mean of batch means);
* the early-stopping value ``valid_loss_no_back_std`` = (7 * valid_loss - back_std MSE) / 6, as upstream: the
  background-std score is the one the CNN cannot learn well (r 0.64), so it does not decide the best epoch;
* per property: the MSE, the MAE and Pearson r (``stylegan_modified.attribute_metrics``; r 0 for a constant
  series).

The epoch with the lowest early-stopping value is the best; its weights are the output
(``stylegan_gen_fine_tuned_v2_cnn.pth``, the published name, under the no-overwrite rule). Training stops
``patience`` (20) epochs after the best epoch, or at the epoch cap ``max_epochs`` (200; upstream had none and
stopped after 128 epochs, best 107), whichever comes first.

Logs in the run folder: ``train_log_v2_cnn.csv`` (one row per epoch: upstream's columns, then the project's)
and ``train_log_v2_cnn_val_log.csv`` (the first 30 validation images of every epoch: outputs and labels,
rounded to 4 decimals as upstream, plus their img_no).

The run is resumable exactly (:mod:`stylegan_modified.training_run`): the record holds the weights, the best
weights, AdamW's state, every RNG stream (dropout draws from torch's CPU RNG), the epoch's order and the
running sums of an epoch in progress. The epoch cap is the run's ``epochs`` total: ``--resume --max-epochs N``
extends a run that reached its cap; a run that stopped early is finished whatever the cap.

**Several processes** (torchrun; :mod:`stylegan_modified.ddp`): ``--batch-size`` is the batch of a step over all
processes, each rank trains the DDP-wrapped CNN on its share (dropout draws from each rank's own stream). The
validation batches are shared out among the ranks and their outputs gathered in order, so every rank computes the
same metrics from the same numbers and takes the same early-stopping decision. Rank 0 alone writes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ohlora.checkpoints import load_strict
from ohlora.devices import item_generator
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_CNN_FILE, PROPERTY_NAMES, Layout
from ohlora.resume import STOPPED_EARLY, ResumeRecord
from ohlora.schedules import set_epoch_lr
from stylegan_modified.attribute_metrics import mean_absolute_error, pearson_r
from stylegan_modified.datasets import ScoredImageDataset, check_batch_size, epoch_batches, epoch_order
from stylegan_modified.ddp import agree_stop, describe, mean_over_ranks, share, start_rngs, wrap
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.training_cli import CompatSettings, check_at_least
from stylegan_modified.training_control import (GracefulStop, MixedPrecision, Throughput, WorkersStopped, check_finite,
                                                epoch_loader, workers_stopped_error)
from stylegan_modified.training_run import (RunPlan, TrainingRun, TrainLog, checkpoint_kept, cpu_state_dict,
                                            describe_position, restore_optimizers, resume_record, start_position)

VERSION = 'v2_cnn'
MODEL, BEST = 'property_cnn', 'best_property_cnn'   # names in the resume record; BEST is the published output
SPLIT_STREAM, INIT_STREAM = 70, 71                   # item_generator streams: the 90/10 split, the initial weights
VALIDATION_LOG_IMAGES = 30
DECIMALS = 4
EPOCH_OPTION = '--max-epochs'
# Upstream's log names of the seven properties (train_log_v2_cnn.csv), in the standard order.
LOG_NAMES = dict(zip(PROPERTY_NAMES, ('eyes_score', 'hair_color_score', 'hair_length_score', 'mouth_score',
                                      'pose_score', 'back_mean_score', 'back_std_score')))
BACK_STD = PROPERTY_NAMES.index('background_std')
LOG_COLUMNS = ('epoch', 'valid_loss', *(f'{n}_loss' for n in LOG_NAMES.values()),
               *(f'{n}_abs_diff' for n in LOG_NAMES.values()), *(f'{n}_corr' for n in LOG_NAMES.values()),
               'train_loss', 'valid_loss_no_back_std', 'lr', 'best_epoch', 'images_per_s', 'peak_gpu_mem_mb')
VALIDATION_LOG_COLUMNS = ('epoch', *(f'{n}_{kind}' for n in LOG_NAMES.values() for kind in ('output', 'label')),
                          'img_no')


@dataclass(frozen=True)
class CnnHyperparameters:
    """Upstream's fixed settings of the property-CNN training, recorded with the options."""
    lr: float = 5e-5
    weight_decay: float = 0.01   # AdamW's default, as upstream
    cosine_period: int = 10      # CosineAnnealingLR T_max


@dataclass(frozen=True)
class PropertyCnnSettings(CompatSettings):
    """The options of the CNN phase; ``device`` is the resolved device, ``scores`` the scores CSV as recorded
    (relative to the root or its name; None: ``all_scores_v2.csv``)."""
    max_epochs: int = 200
    patience: int = 20
    batch_size: int = 16
    eval_batch_size: int = 16
    workers: int = 2
    seed: int = 0
    device: str = 'cpu'
    checkpoint_every: int = 0
    amp: bool = False
    tf32: bool = False
    compat: str | None = None
    scores: str | None = None
    no_progress: bool = False
    hyper: CnnHyperparameters = field(default_factory=CnnHyperparameters)

    def check(self, world_size: int = 1) -> None:
        check_at_least((EPOCH_OPTION, self.max_epochs, 1), ('--patience', self.patience, 1),
                       ('--batch-size', self.batch_size, 1), ('--eval-batch-size', self.eval_batch_size, 1),
                       ('--workers', self.workers, 0), ('--checkpoint-every', self.checkpoint_every, 0))
        check_batch_size(self.batch_size, 1, world_size=world_size)  # an even split over the processes

    def options(self) -> dict:
        """Plain JSON types; the epoch cap is the run's ``epochs`` total (the one value --resume may change)."""
        options = asdict(self)
        options['epochs'] = options.pop('max_epochs')
        options['schedule'] = self.schedule
        options['trainer'] = 'property_cnn_v2'
        return options


# --- data ---
def train_validation_split(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded 90/10 split of ``range(size)``: (training indices, validation indices), each int64.

    The validation part keeps its drawn order (its first images are the ones the validation log shows).
    """
    if size < 2:
        raise PipelineError(f'the property CNN needs at least 2 scored images (one to train, one to validate), '
                            f'got {size}')
    order = torch.randperm(size, generator=item_generator(seed, 0, SPLIT_STREAM))
    n_train = min(max(size * 9 // 10, 1), size - 1)
    return order[:n_train], order[n_train:]


def epoch_train_order(seed: int, epoch: int, train_indices: torch.Tensor) -> torch.Tensor:
    """Dataset indices of the training part in epoch ``epoch``'s order (depends on (seed, epoch) only)."""
    return train_indices[epoch_order(seed, epoch, len(train_indices))]


# --- metrics and early stopping ---
@dataclass(frozen=True)
class ValidationResult:
    valid_loss: float
    valid_loss_no_back_std: float
    mse: np.ndarray     # (7,) per property
    mae: np.ndarray     # (7,)
    r: np.ndarray       # (7,)

    def per_property(self) -> dict[str, dict[str, float]]:
        return {name: {'r': float(self.r[k]), 'mae': float(self.mae[k]), 'mse': float(self.mse[k])}
                for k, name in enumerate(PROPERTY_NAMES)}


def validation_metrics(outputs: np.ndarray, labels: np.ndarray) -> ValidationResult:
    """Metrics of (n, 7) outputs against labels, in float64; the early-stopping value as upstream computed it."""
    outputs, labels = np.asarray(outputs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    mse = np.square(outputs - labels).mean(axis=0)
    valid_loss = float(mse.mean())
    return ValidationResult(valid_loss, (7 * valid_loss - float(mse[BACK_STD])) / 6, mse,
                            np.asarray(mean_absolute_error(labels, outputs, axis=0)),
                            np.asarray(pearson_r(outputs, labels, axis=0)))


@dataclass
class EarlyStopping:
    """Best value and epoch so far; stop ``patience`` epochs after the best one."""
    patience: int
    best_value: float = math.inf
    best_epoch: int = -1

    def update(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch``'s value; True if it is the new best (strictly lower)."""
        if value < self.best_value:
            self.best_value, self.best_epoch = value, epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        return self.best_epoch >= 0 and epoch - self.best_epoch >= self.patience

    def state(self) -> dict:
        return {'best_value': self.best_value, 'best_epoch': self.best_epoch}

    @classmethod
    def from_state(cls, patience: int, state: dict) -> 'EarlyStopping':
        return cls(patience, float(state.get('best_value', math.inf)), int(state.get('best_epoch', -1)))

    @classmethod
    def from_record(cls, patience: int, record: ResumeRecord) -> 'EarlyStopping':
        return cls.from_state(patience, record.extra.get('early_stopping', {}))


# --- the model ---
def new_property_cnn(seed: int) -> PropertyScoreCNN:
    """A fresh CNN (PyTorch's default init) drawn from its own RNG seeded by ``seed``; the global streams are
    left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_generator(seed, 0, INIT_STREAM).initial_seed())
        return PropertyScoreCNN()


def property_cnn_from_state(state: dict, where: Path, what: str = 'property CNN of the resume record') \
        -> PropertyScoreCNN:
    if not isinstance(state, dict):
        raise PipelineError(f'{where} lacks the {what}')
    return load_strict(PropertyScoreCNN(), state, where, what)


# --- the run ---
@dataclass
class CnnResult:
    status: str                         # 'finished', 'stopped early', 'interrupted' or 'already finished'
    epochs: int                         # epochs finished
    batch: int
    step: int
    best_epoch: int
    best_value: float
    best_metrics: dict                  # per property {'r', 'mae', 'mse'} at the best epoch
    best_state: dict | None             # the best epoch's weights (what the published file holds)
    output: Path
    run_folder: Path
    restored: tuple[Path, ...] = ()
    signal: str | None = None

    @property
    def position(self) -> str:
        return describe_position(self.epochs, self.batch, self.step)


class PropertyCnnTraining:
    """The CNN phase of one v2 run: its run folder, its checks (:meth:`plan`) and its epochs (:meth:`train`)."""

    def __init__(self, layout: Layout, settings: PropertyCnnSettings, dataset: ScoredImageDataset,
                 outdir: str | Path | None = None, ctx: DistContext | None = None):
        self.ctx = ctx if ctx is not None else DistContext(device=torch.device(settings.device))
        settings.check(self.ctx.world_size)
        self.settings, self.dataset = settings, dataset
        self.device = self.ctx.device
        self.train_indices, self.val_indices = train_validation_split(len(dataset), settings.seed)
        self.files = layout.training_run(VERSION, outdir)
        self.output = self.files.checkpoint(PROPERTY_CNN_FILE)
        options = settings.options()
        options['data'] = {'images': len(dataset), 'fingerprint': dataset.fingerprint(),
                           'train': len(self.train_indices), 'validation': len(self.val_indices)}
        options['world_size'] = self.ctx.world_size
        self.val_log_rows = min(VALIDATION_LOG_IMAGES, len(self.val_indices))
        self.run = TrainingRun(self.files, options, {self.output: BEST}, LOG_COLUMNS, epochs_option=EPOCH_OPTION,
                               log_rows=lambda record: record.epoch, writer=self.ctx.is_main)
        self.val_log = TrainLog(self.files.validation_log, VALIDATION_LOG_COLUMNS, enabled=self.ctx.is_main)

    def plan(self, resume: bool, overwrite: bool = False) -> RunPlan:
        return self.run.plan(resume=resume, overwrite=overwrite)

    def finished_result(self, plan: RunPlan) -> CnnResult:
        record = plan.record
        stopping = EarlyStopping.from_record(self.settings.patience, record)
        return CnnResult('already finished', record.epoch, record.batch, record.step, stopping.best_epoch,
                         stopping.best_value, record.extra.get('best_metrics', {}), record.models.get(BEST),
                         self.output, self.files.folder, plan.restored)

    def train(self, plan: RunPlan, provenance: dict | None = None) -> CnnResult:
        """Train from ``plan`` (fresh or resumed) until early stopping, the cap or a stop signal."""
        record = plan.record
        if record is None:
            model = new_property_cnn(self.settings.seed)
        else:
            model = property_cnn_from_state(record.models.get(MODEL), self.files.resume_record)
        trainer = _CnnTrainer(model, self.settings, self.device, self.ctx)
        if record is not None:
            trainer.load_record(record, self.files.resume_record)
        self.run.start(plan, provenance)
        if record is None:
            self.val_log.reset()
        elif self.ctx.is_main:
            self.val_log.load(keep=record.epoch * self.val_log_rows)
        describe(self.ctx, 'v2 property CNN', self.settings.batch_size)
        return self.run.train(lambda: self._epochs(trainer, record), self.ctx, self.settings.tf32, (self.val_log,))

    def _epochs(self, trainer: '_CnnTrainer', record: ResumeRecord | None) -> CnnResult:
        settings, dataset, ctx = self.settings, self.dataset, self.ctx
        epoch, batch, step, order = start_position(record)
        start_rngs(ctx, settings.seed, record)
        if record is not None:
            trainer.last_checkpoint = checkpoint_kept(epoch, batch, step)
        per_epoch = len(epoch_batches(range(len(self.train_indices)), settings.batch_size, 1, ctx.world_size))
        bar = tqdm(total=(settings.max_epochs - epoch) * per_epoch - batch, desc='v2 property CNN', unit='step',
                   disable=settings.no_progress or not ctx.is_main)
        val_batches = [self.val_indices[k:k + settings.eval_batch_size].tolist()
                       for k in range(0, len(self.val_indices), settings.eval_batch_size)]

        def checkpoint(next_epoch, next_batch, current_order):
            self.val_log.flush()
            self.run.checkpoint(trainer.record(self.run.options, next_epoch, next_batch, step, current_order))
            trainer.last_checkpoint = checkpoint_kept(next_epoch, next_batch, step)

        def result(status, done_epoch, done_batch, signal=None):
            stopping = trainer.stopping
            return CnnResult(status, done_epoch, done_batch, step, stopping.best_epoch, stopping.best_value,
                             trainer.best_metrics, trainer.best_state, self.output, self.files.folder, signal=signal)

        try:
            with GracefulStop() as stop:
                while epoch < settings.max_epochs:
                    if order is None:
                        order = epoch_train_order(settings.seed, epoch, self.train_indices)
                        trainer.start_epoch()
                    batches = epoch_batches(order, settings.batch_size, 1, ctx.world_size)
                    lr = trainer.set_lr(epoch)
                    trainer.restart_timer()
                    loader = epoch_loader(dataset, [share(b, ctx) for b in batches[batch:]], settings.workers,
                                          self.device)
                    done = batch  # batches of this epoch whose step is complete
                    for idx, items in enumerate(stop.batches(loader), start=batch):
                        trainer.where = describe_position(epoch, idx, step + 1)
                        loss = trainer.step(items['image'], items['label'])
                        step += 1
                        done = idx + 1
                        stopping = agree_stop(ctx, stop)
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, loss=f'{loss:.4f}',
                                        best=f'{trainer.stopping.best_value:.4f}@{trainer.stopping.best_epoch}')
                        last = idx + 1 == len(batches)
                        if not last and ((settings.checkpoint_every and step % settings.checkpoint_every == 0)
                                         or stopping):
                            trainer.add_train_time()
                            checkpoint(epoch, idx + 1, order)
                            if stopping:
                                return result('interrupted', epoch, idx + 1, stopping)
                            trainer.restart_timer()
                    trainer.add_train_time()
                    trainer.where = f'epoch {epoch} (validation)'
                    # each rank scores every world_size-th validation batch; validate() gathers them in order
                    mine = val_batches[ctx.rank::ctx.world_size]
                    validation = trainer.validate(stop.batches(epoch_loader(dataset, mine, settings.workers,
                                                                            self.device)))
                    self._log_epoch(trainer, epoch, lr, validation)
                    stopped = trainer.stopping.should_stop(epoch)
                    if stopped:
                        trainer.extra[STOPPED_EARLY] = True
                    checkpoint(epoch + 1, 0, None)
                    epoch, batch, order = epoch + 1, 0, None
                    if stopped:
                        return result('stopped early', epoch, 0)
                    if stop.requested:  # agreed: set on every rank by agree_stop after the epoch's last step
                        return result('interrupted', epoch, 0, stop.requested)
        except WorkersStopped:  # the stop signal killed a worker as it started: the stop, found between two steps
            if ctx.distributed:
                raise workers_stopped_error(stop, trainer.last_checkpoint) from None
            if done < len(batches):
                trainer.add_train_time()
            # done == len(batches): the epoch's steps are complete and its validation is not; --resume validates
            checkpoint(epoch, done, order)
            return result('interrupted', epoch, done, stop.requested)
        finally:
            bar.close()
        return result('finished', epoch, 0)

    def _log_epoch(self, trainer: '_CnnTrainer', epoch: int, lr: float, validation: tuple) -> None:
        metrics, outputs, labels, indices = validation
        improved = trainer.stopping.update(epoch, metrics.valid_loss_no_back_std)
        if improved:
            trainer.best_state = cpu_state_dict(trainer.model)
            trainer.best_metrics = metrics.per_property()
        row = {'epoch': epoch, 'valid_loss': metrics.valid_loss, 'train_loss': trainer.epoch_train_loss(),
               'valid_loss_no_back_std': metrics.valid_loss_no_back_std, 'lr': lr,
               'best_epoch': trainer.stopping.best_epoch, 'images_per_s': trainer.images_per_s(),
               'peak_gpu_mem_mb': trainer.meter.peak_memory_mb()}
        for k, name in enumerate(LOG_NAMES.values()):
            row.update({f'{name}_loss': float(metrics.mse[k]), f'{name}_abs_diff': float(metrics.mae[k]),
                        f'{name}_corr': float(metrics.r[k])})
        self.run.log.append(row)
        for n in range(self.val_log_rows):
            entry = {'epoch': epoch, 'img_no': self.dataset.img_nos[int(indices[n])]}
            for k, name in enumerate(LOG_NAMES.values()):
                entry[f'{name}_output'] = round(float(outputs[n, k]), DECIMALS)
                entry[f'{name}_label'] = round(float(labels[n, k]), DECIMALS)
            self.val_log.append(entry)


class _CnnTrainer:
    """The CNN, its optimiser, AMP, the best weights and the sums of the epoch in progress; writes no files."""

    def __init__(self, model: PropertyScoreCNN, settings: PropertyCnnSettings, device: torch.device,
                 ctx: DistContext | None = None):
        self.model = model.to(device).train()
        self.settings, self.device = settings, device
        self.ctx = ctx if ctx is not None else DistContext(device=torch.device(device))
        self.train_model = wrap(self.model, self.ctx)  # every parameter trains
        hyper = settings.hyper
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
        self.amp = MixedPrecision(settings.amp, device, (MODEL,))
        self.stopping = EarlyStopping(settings.patience)
        self.best_state: dict | None = None
        self.best_metrics: dict = {}
        self.extra: dict = {}
        self.meter = Throughput(device)
        self.where = ''
        self.last_checkpoint = 'no checkpoint had been written yet'

    # The running sums of an epoch live in ``extra``, so a resume inside the epoch continues them exactly.
    def start_epoch(self) -> None:
        self.extra.update(train_loss_sum=0.0, train_images=0, train_seconds=0.0)

    def restart_timer(self) -> None:
        self.meter.restart()

    def add_train_time(self) -> None:
        """Training time since the last restart (checkpoints and validation are not timed)."""
        last = self.meter.last
        self.meter.restart()
        self.extra['train_seconds'] = self.extra.get('train_seconds', 0.0) + (self.meter.last - last)

    def set_lr(self, epoch: int) -> float:
        hyper = self.settings.hyper
        return set_epoch_lr(self.optimizer, [hyper.lr], epoch, hyper.cosine_period, self.settings.schedule)[0]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        with self.amp.autocast():
            outputs = self.train_model(images)
        loss = F.mse_loss(outputs.float(), labels)
        value, = mean_over_ranks(self.ctx, loss)  # the whole batch's loss: the same NaN stop on every rank
        check_finite(self.where, self.last_checkpoint, loss=value)
        self.amp.step(MODEL, loss, self.optimizer)
        images = len(labels) * self.ctx.world_size  # equal shares
        self.extra['train_loss_sum'] += value * images
        self.extra['train_images'] += images
        return value

    def epoch_train_loss(self) -> float | None:
        images = self.extra.get('train_images', 0)
        return self.extra['train_loss_sum'] / images if images else None

    def images_per_s(self) -> float | None:
        seconds = self.extra.get('train_seconds', 0.0)
        return round(self.extra.get('train_images', 0) / seconds, 2) if seconds > 0 else None

    def validate(self, batches) -> tuple[ValidationResult, np.ndarray, np.ndarray, np.ndarray]:
        """(metrics, outputs, labels, dataset indices) of the validation images, in eval mode. With several
        processes ``batches`` are this rank's (every world_size-th) and the result is every rank's, in order."""
        self.model.eval()
        outputs, labels, indices = [], [], []
        with torch.no_grad():
            for items in batches:
                with self.amp.autocast():
                    out = self.model(items['image'].to(self.device, non_blocking=True))
                outputs.append(out.float().cpu().numpy())
                labels.append(items['label'].numpy())
                indices.append(items['index'].numpy())
        self.model.train()
        if self.ctx.distributed:
            ranks, world = self.ctx.all_gather_objects((outputs, labels, indices)), self.ctx.world_size
            count = sum(len(rank[0]) for rank in ranks)
            # validation batch k is batch k // world of rank k % world
            outputs, labels, indices = ([ranks[k % world][part][k // world] for k in range(count)]
                                        for part in range(3))
        outputs, labels = np.concatenate(outputs), np.concatenate(labels)
        metrics = validation_metrics(outputs, labels)
        check_finite(self.where, self.last_checkpoint, valid_loss=metrics.valid_loss)
        return metrics, outputs, labels, np.concatenate(indices)

    def record(self, options: dict, epoch: int, batch: int, step: int,
               order: torch.Tensor | None) -> ResumeRecord | None:
        """The resume record (every rank calls it: the RNG states are gathered); None on ranks other than 0."""
        return resume_record(self.ctx, options, epoch, batch, step, order, self._record_contents)

    def _record_contents(self) -> dict:
        models = {MODEL: cpu_state_dict(self.model)}
        if self.best_state is not None:
            models[BEST] = self.best_state
        extra = {**self.extra, 'early_stopping': self.stopping.state(), 'best_metrics': self.best_metrics}
        return dict(models=models, optimizers={MODEL: self.optimizer.state_dict()}, scalers=self.amp.state_dict(),
                    extra=extra)

    def load_record(self, record: ResumeRecord, where: Path) -> None:
        restore_optimizers(record, {MODEL: self.optimizer}, self.amp,
                           f'{where}: its optimiser state does not fit the property CNN')
        self.stopping = EarlyStopping.from_record(self.settings.patience, record)
        self.best_metrics = dict(record.extra.get('best_metrics', {}))
        self.extra = {k: v for k, v in record.extra.items() if k not in ('early_stopping', 'best_metrics')}
        self.best_state = record.models.get(BEST)
