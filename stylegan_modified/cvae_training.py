"""Stage 5 v3: a conditional VAE whose decoder is the v1 generator (PIPELINE.md §7.4).

**One step** (:meth:`CVAETrainer.step`), for a batch of real images x in [-1, 1] and their 7-value labels y
(``all_scores_v2_cnn.csv``):

1. (mu, logvar) = encoder(x, y); z = mu + eps * exp(logvar / 2), eps ~ N(0, I) from torch's CPU RNG;
2. image = G(z, y) (train mode as upstream: no style mixing, stored noise, no truncation; only ``w_avg``
   follows the batches);
3. the frozen property CNN scores the image (7 values) and the frozen gender CNN gives P(woman);
4. loss = C + G + 0.2 M + 0.05 V: C the mean of the MSEs of eyes, mouth and pose (columns 0, 3, 4) against
   y, G = MSE(gender, 1), M = mean(mu^2), V = mean(logvar^2). There is no pixel reconstruction term.

Only G's mapping (dense0-7, label_weight) and the encoder train: one AdamW, two groups (G 1e-4, encoder 1e-5,
betas 0.9/0.999, weight decay 0.01), the LR set per epoch by the cosine of :mod:`ohlora.schedules` (period 10;
``restarts`` by default, never 0; upstream's curve with ``--compat upstream``). Both CNNs are frozen and in eval
mode; the gender CNN, trained on [0, 1] images, gets (x + 1) / 2. ``--compat upstream``: both CNNs in train mode
(dropout on, in the loss and in the test) and the raw [-1, 1] image for the gender CNN (§13 rows 16, 17).

**Per epoch** (:mod:`stylegan_modified.v3_epoch_test`): the test of the epoch's generator; if a z passes, the
G state_dict and the encoder state_dict as ``stylegan_gen_fine_tuned_v3_ckpt_EEEE_{gen,enc}.pth`` and the best
passing z as ``test_z_vector_EEEE.csv`` (no-overwrite rule; the data files shipped beside the code are never
written). ``--patience N`` stops when the epoch-mean loss has not improved for N epochs. After the last epoch
(or the early stop), ``stylegan_gen_fine_tuned_v3.pth`` / ``…_v3_encoder.pth`` hold the **last epoch's**
generator and encoder.

**Log** ``train_log_v3.csv`` (one row per step, no index column): epoch, idx, total_loss, property_loss (C),
gender_loss (G), mu_loss (M), logvar_loss (V), lr_generator, lr_encoder; on the last row of each epoch also
epoch_mean_loss, passing_z (z's that passed the test) and best_z (its index, empty when none passed);
images_per_s, peak_gpu_mem_mb.

**Several processes** (torchrun; :mod:`stylegan_modified.ddp`): ``--batch-size`` is the batch of a step over all
processes; each rank encodes and decodes its share, the encoder and G (whose mapping alone trains) are in DDP
wrappers, and nothing in the loss mixes samples, so N ranks take the step one process takes on the whole batch
(up to float rounding; the eps differ, each rank drawing its own). ``w_avg`` follows the whole batch's mean w;
the log and the patience rule use the losses averaged over the ranks. The per-epoch test runs on rank 0 alone
(its history holds the first sample of each batch, as one process's) while the others wait; its outcome is
broadcast, so every rank keeps the same summary. Rank 0 alone writes.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ohlora.devices import tf32
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import PROPERTY_NAMES, Layout, TrainingRunFolder, V3Outputs, shipped_with_code
from ohlora.owned_files import OwnedFiles
from ohlora.records import sha256_of
from ohlora.resume import ResumeRecord, load_resume_record, option_differences, save_resume_record
from ohlora.schedules import UPSTREAM_PERIOD, set_epoch_lr
from stylegan_modified.attribute_metrics import CONTROLLED_ATTRIBUTES, UPSTREAM_V3_RULE, V3_TEST_GRID, PassRule
from stylegan_modified.cvae_encoder import CVAEEncoder, reparameterize
from stylegan_modified.datasets import ScoredImageDataset, check_batch_size, epoch_batches, epoch_order
from stylegan_modified.ddp import (agree_stop, describe, distribute_generator, main_first, mean_over_ranks, share,
                                   start_rngs, training_context, wrap)
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.checkpoint import load_property_cnn
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3
from stylegan_modified.training_cli import CompatSettings, check_at_least
from stylegan_modified.training_control import (GracefulStop, MixedPrecision, Throughput, WorkersStopped, check_finite,
                                                epoch_loader, workers_stopped_error)
from stylegan_modified.training_run import (RunPlan, TrainingRun, checkpoint_kept, cpu_state_dict, describe_position,
                                            restore_optimizers, resume_record, start_position)
from stylegan_modified.v3_epoch_test import (HISTORY_SIZE, EpochTestResult, EpochTestSettings, MuLogvarHistory,
                                             run_epoch_test, z_csv_bytes)
from stylegan_modified.v3_inputs import (build_v3_models, check_labels_cnn, fetch_input, load_gender_cnn,
                                         scores_csv_path, v3_models_from_state)

logger = logging.getLogger(__name__)

VERSION = 'v3'
IMAGE_RESOLUTION = 256
G_NAME, E_NAME = 'generator', 'encoder'
AMP_NAME = 'cvae'
SUPERVISED = tuple(PROPERTY_NAMES.index(a) for a in CONTROLLED_ATTRIBUTES)  # eyes, mouth, pose: 0, 3, 4
LOSS_COLUMNS = ('total_loss', 'property_loss', 'gender_loss', 'mu_loss', 'logvar_loss')
LOG_COLUMNS = ('epoch', 'idx', *LOSS_COLUMNS, 'lr_generator', 'lr_encoder', 'epoch_mean_loss', 'passing_z',
               'best_z', 'images_per_s', 'peak_gpu_mem_mb')
TEST_BATCH_FACTOR = 4  # the per-epoch test renders 4 x --batch-size images per call (no gradients to keep)


@dataclass(frozen=True)
class Hyperparameters:
    """Upstream's fixed v3 settings; recorded with the options."""
    generator_lr: float = 1e-4
    encoder_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    mu_weight: float = 0.2
    logvar_weight: float = 0.05
    lr_period: int = UPSTREAM_PERIOD
    history_size: int = HISTORY_SIZE


@dataclass(frozen=True)
class V3Settings(CompatSettings):
    """The options of a v3 run; the input paths are filled in by :func:`fine_tune_v3` (relative to the root, or
    a file name; None: the default file)."""
    epochs: int
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    device: str = 'cpu'
    patience: int | None = None
    checkpoint_every: int = 0
    test_z: int = 30
    test_grid: dict = field(default_factory=lambda: {k: list(v) for k, v in V3_TEST_GRID.items()})
    pass_min_r: dict = field(default_factory=dict)    # overrides of UPSTREAM_V3_RULE
    pass_max_mae: dict = field(default_factory=dict)  # (None: no MAE bound for that attribute)
    test_random: int = 30
    amp: bool = False
    tf32: bool = False
    v1_weights: str | None = None
    property_cnn: str | None = None
    gender_cnn: str | None = None
    scores: str | None = None
    compat: str | None = None
    no_progress: bool = False
    hyper: Hyperparameters = field(default_factory=Hyperparameters)

    def rule(self) -> PassRule:
        try:
            return UPSTREAM_V3_RULE.with_thresholds(self.pass_min_r, self.pass_max_mae)
        except ValueError as exc:
            raise PipelineError(f'--pass-min-r / --pass-max-mae: {exc}') from None

    def check(self, world_size: int = 1) -> None:
        """One line per option a user can get wrong (before anything is read or written)."""
        check_batch_size(self.batch_size, 1, world_size=world_size)  # no minibatch-stddev: only the even split
        check_at_least(('--epochs', self.epochs, 1), ('--batch-size', self.batch_size, 1),
                       ('--workers', self.workers, 0), ('--checkpoint-every', self.checkpoint_every, 0),
                       ('--test-z', self.test_z, 1), ('--test-random', self.test_random, 0))
        if self.patience is not None:
            check_at_least(('--patience', self.patience, 1))
        if self.test_z > self.hyper.history_size:
            raise PipelineError(f'--test-z {self.test_z}: the test draws its z from the last '
                                f'{self.hyper.history_size} batches of an epoch; use at most that')
        for attribute, threshold in self.rule().thresholds.items():
            if len(set(self.test_grid.get(attribute, ()))) < 2 and threshold.min_r > 0:
                # r of a constant request is 0 (attribute_metrics.pearson_r), so no z passes and no epoch is saved
                logger.warning(f'--test-grid holds {attribute} constant, but the pass rule needs its r >= '
                               f'{threshold.min_r:g}, and r of a constant request is 0: no z can pass; give '
                               f'{attribute} two or more values, or --pass-min-r {attribute}=0')

    def options(self, rule: PassRule) -> dict:
        """The resolved options as plain JSON types (what training_options.json and the record hold)."""
        options = asdict(self)
        options['hyper']['betas'] = list(options['hyper']['betas'])
        options['pass_rule'] = {a: [t.min_r, t.max_mae] for a, t in rule.thresholds.items()}
        options['trainer'] = f'stylegan_fine_tuning_{VERSION}'
        return options


# --- one step ---
def set_trainable(generator: torch.nn.Module, encoder: torch.nn.Module, frozen: tuple[torch.nn.Module, ...]) -> None:
    for name, parameter in generator.named_parameters():
        parameter.requires_grad_(name.startswith('mapping.'))
    encoder.requires_grad_(True)
    for module in frozen:
        module.requires_grad_(False)


@dataclass
class StepLosses:
    total_loss: float
    property_loss: float
    gender_loss: float
    mu_loss: float
    logvar_loss: float


class CVAETrainer:
    """The generator, the encoder, the two frozen CNNs, the optimiser and the step; holds no data, writes nothing.
    With several processes (``ctx``) a step trains on this rank's share through the DDP wrappers
    ``generator_train`` / ``encoder_train``."""

    def __init__(self, generator: StyleGANGeneratorForV3, encoder: CVAEEncoder, property_cnn: PropertyScoreCNN,
                 gender_cnn: torch.nn.Module, settings: V3Settings, device: torch.device,
                 ctx: DistContext | None = None):
        self.settings, self.hyper, self.device = settings, settings.hyper, torch.device(device)
        self.ctx = ctx if ctx is not None else DistContext(device=self.device)
        self.generator = generator.to(self.device).train()  # train mode only moving-averages w_avg (no mixing)
        self.encoder = encoder.to(self.device).train()
        # R2: frozen nets in eval mode; upstream left them in train mode (dropout on)
        self.property_cnn = property_cnn.to(self.device).train(settings.upstream)
        self.gender_cnn = gender_cnn.to(self.device).train(settings.upstream)
        set_trainable(self.generator, self.encoder, (self.property_cnn, self.gender_cnn))
        # built after the flags: DDP syncs the mapping and the encoder, nothing frozen
        self.generator_train, self.encoder_train = wrap(self.generator, self.ctx), wrap(self.encoder, self.ctx)
        distribute_generator(self.generator, self.ctx)
        mapping = [p for n, p in self.generator.named_parameters() if n.startswith('mapping.')]
        self.base_lrs = [self.hyper.generator_lr, self.hyper.encoder_lr]
        self.optimizer = torch.optim.AdamW([{'params': mapping, 'lr': self.base_lrs[0]},
                                            {'params': list(self.encoder.parameters()), 'lr': self.base_lrs[1]}],
                                           betas=self.hyper.betas, weight_decay=self.hyper.weight_decay)
        self.amp = MixedPrecision(settings.amp, self.device, (AMP_NAME,))
        # the supervised label columns as a device index (indexing with a Python tuple copies one to the GPU, and
        # waits for it, at every step)
        self.supervised = torch.tensor(SUPERVISED, device=self.device)
        self.history = MuLogvarHistory(self.hyper.history_size)
        self.lrs = list(self.base_lrs)
        self.where = ''
        self.last_checkpoint = 'no checkpoint had been written yet'

    def set_epoch(self, epoch: int) -> list[float]:
        self.lrs = set_epoch_lr(self.optimizer, self.base_lrs, epoch, self.hyper.lr_period, self.settings.schedule)
        return self.lrs

    def gender_input(self, images: torch.Tensor) -> torch.Tensor:
        """The gender CNN was trained on [0, 1] images (R2 / §13 row 16); upstream fed the raw [-1, 1] output."""
        return images if self.settings.upstream else (images + 1) / 2

    def property_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.property_cnn(images)

    def gender_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.gender_cnn(self.gender_input(images))

    def losses(self, images: torch.Tensor, labels: torch.Tensor,
               eps: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The four loss terms and their weighted sum, with the batch's mu and logvar. ``eps`` (default: drawn)
        is the reparameterisation noise."""
        with self.amp.autocast():
            mu, logvar = self.encoder_train(images, labels)
        mu, logvar = mu.float(), logvar.float()
        if eps is None:
            eps = torch.randn(mu.shape)  # the CPU RNG, whatever the device (as the v1 trainer's z)
            if self.device.type == 'cuda':  # a copy from pinned memory does not wait for the GPU
                eps = eps.pin_memory()
        z = reparameterize(mu, logvar, eps.to(self.device, non_blocking=True))
        with self.amp.autocast():
            generated = self.generator_train(z, labels, style_mixing_prob=0.0, trunc_psi=1.0, trunc_layers=0,
                                             randomize_noise=False)['image']
            scores = self.property_scores(generated).float()
            gender = self.gender_scores(generated).float()
        terms = {'property_loss': F.mse_loss(scores.index_select(1, self.supervised),
                                             labels.index_select(1, self.supervised)),
                 'gender_loss': F.mse_loss(gender, torch.ones_like(gender)),
                 'mu_loss': mu.square().mean(),
                 'logvar_loss': logvar.square().mean()}
        terms['total_loss'] = (terms['property_loss'] + terms['gender_loss'] + self.hyper.mu_weight * terms['mu_loss']
                               + self.hyper.logvar_weight * terms['logvar_loss'])
        return terms, mu, logvar

    def step(self, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor | None = None) -> StepLosses:
        """One optimiser step on this process's images; the losses returned are the means over the ranks."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        terms, mu, logvar = self.losses(images, labels) if eps is None else self.losses(images, labels, eps)
        # Every value the step needs on the host (the five losses, the history's first mu and logvar rows) in one
        # device-to-host copy: each float() of a CUDA tensor would wait for the GPU on its own.
        # (float64 holds every float32 value exactly: the same numbers as float() of each)
        host = torch.cat([torch.stack([t.detach().double() for t in terms.values()]), mu[0].detach().double(),
                          logvar[0].detach().double()]).cpu()
        means = dict(zip(terms, mean_over_ranks(self.ctx, *host[:len(terms)].tolist())))
        check_finite(self.where, self.last_checkpoint, loss=means['total_loss'])
        self.amp.step(AMP_NAME, terms['total_loss'], self.optimizer)
        mu_row, logvar_row = host[len(terms):].view(2, 1, -1)
        self.history.add(mu_row, logvar_row)
        return StepLosses(**means)

    def epoch_test(self, epoch: int, settings: EpochTestSettings, outputs: V3Outputs | None,
                   progress: bool = False) -> EpochTestResult:
        folder = outputs.epoch_test(epoch) if outputs is not None else None
        return run_epoch_test(self.generator, self.property_scores, self.gender_scores, self.history, epoch, settings,
                              folder, progress)

    def record(self, options: dict, epoch: int, batch: int, step: int, order: torch.Tensor | None,
               extra: dict) -> ResumeRecord | None:
        """The resume record (every rank calls it: the RNG states are gathered); None on ranks other than 0."""
        return resume_record(self.ctx, options, epoch, batch, step, order, lambda: dict(
            models={G_NAME: cpu_state_dict(self.generator), E_NAME: cpu_state_dict(self.encoder)},
            optimizers={AMP_NAME: self.optimizer.state_dict()}, scalers=self.amp.state_dict(),
            extra={**extra, 'history': self.history.state_dict()}))

    def load_record(self, record: ResumeRecord) -> None:
        restore_optimizers(record, {AMP_NAME: self.optimizer}, self.amp,
                           'the resume record\'s optimiser state does not fit the models')
        if 'history' in record.extra:
            self.history.load_state_dict(record.extra['history'])


# --- the run ---
@dataclass
class EpochSummary:
    epoch: int
    mean_loss: float
    passing_z: int
    best_z: int | None


@dataclass
class V3Result:
    status: str                  # 'finished', 'interrupted' or 'already finished'
    epoch: int                   # epochs finished (or in progress when interrupted)
    batch: int
    step: int
    outputs: tuple[Path, ...]    # the final generator and encoder
    run_folder: Path
    epochs: list[EpochSummary] = field(default_factory=list)
    checkpoints: tuple[Path, ...] = ()   # per-epoch files of passing epochs
    stopped_early: bool = False
    restored: tuple[Path, ...] = ()
    signal: str | None = None


class EpochOutputs:
    """The published-name files of passing epochs: checked before the run, written under the no-overwrite rule,
    and never onto a data file shipped beside the code."""

    def __init__(self, outputs: V3Outputs, owned: OwnedFiles):
        self.outputs, self.owned = outputs, owned

    @staticmethod
    def _refuse_shipped(path: Path, epoch: int) -> None:
        if shipped_with_code(path):
            raise PipelineError(f'{path} ships with the code and is never overwritten, not even with --overwrite '
                                f'(epoch {epoch} of this run would write there if one of its test z passes); '
                                'choose another --root or --outdir')

    def check(self, epochs: range, overwrite: bool) -> None:
        paths = []
        for epoch in epochs:
            for path in self.outputs.epoch_files(epoch):
                self._refuse_shipped(path, epoch)
                paths.append(path)
        self.owned.check(paths, overwrite)

    def write(self, epoch: int, result: EpochTestResult, generator_state: dict,
              encoder_state: dict) -> tuple[Path, ...]:
        if result.best is None:
            return ()
        gen, enc, z_csv = self.outputs.epoch_files(epoch)
        for path in (gen, enc, z_csv):
            self._refuse_shipped(path, epoch)
        self.owned.torch_save(gen, generator_state)
        self.owned.torch_save(enc, encoder_state)
        self.owned.write_bytes(z_csv, z_csv_bytes(result.best_z))
        return gen, enc, z_csv


def _relative(layout: Layout, path: str | Path | None) -> str | None:
    return None if path is None else layout.relative(Path(path))


def _early_stopped(files: TrainingRunFolder, options: dict, changeable) -> ResumeRecord | None:
    """The record of a run that --patience already ended, if this call asks for that same run."""
    if not files.resume_record.is_file():
        return None
    record = load_resume_record(files.resume_record)
    if (record.extra.get('stopped_early') and record.epoch <= options['epochs']
            and not option_differences(record.options, options, changeable)):
        return record
    return None


def fine_tune_v3(layout: Layout, settings: V3Settings, *, v1_weights: str | Path | None = None,
                 property_cnn: str | Path | None = None, gender_cnn: str | Path | None = None,
                 scores_path: str | Path | None = None, outdir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, ctx: DistContext | None = None) -> V3Result:
    """Train (or continue, or confirm finished) the v3 run of ``layout`` / ``outdir``; see the module docstring.

    Everything a user can get wrong is checked before anything is written: the options, the run folder, the
    published and shipped files the run could write, the scores CSV and every image, the three weights files.
    ``ctx``: this process among those of a torchrun (default: from the environment; one process without it).
    """
    settings = replace(settings, v1_weights=_relative(layout, v1_weights),
                       property_cnn=_relative(layout, property_cnn), gender_cnn=_relative(layout, gender_cnn),
                       scores=_relative(layout, scores_path))
    ctx = ctx if ctx is not None else training_context(torch.device(settings.device))
    settings.check(ctx.world_size)
    rule = settings.rule()
    device = ctx.device
    scores_csv = scores_csv_path(layout, scores_path)
    dataset = ScoredImageDataset.filtered(layout, scores_csv, image_size=(IMAGE_RESOLUTION, IMAGE_RESOLUTION),
                                          what='v3 labels (property CNN scores CSV)')
    property_path = main_first(ctx, lambda: fetch_input('property_cnn', layout, property_cnn))
    gender_path = main_first(ctx, lambda: fetch_input('gender_cnn', layout, gender_cnn))
    property_model = load_property_cnn(property_path, device)
    gender_model = load_gender_cnn(gender_path, device)

    files = layout.training_run(VERSION, outdir)
    outputs = V3Outputs(files)
    options = settings.options(rule)
    options['data'] = {'images': len(dataset), 'fingerprint': dataset.fingerprint()}
    # The frozen CNNs are read again on every resume: a different file would make it another run.
    property_sha256 = sha256_of(property_path)
    options['inputs'] = {'property_cnn_sha256': property_sha256, 'gender_cnn_sha256': sha256_of(gender_path)}
    options['world_size'] = ctx.world_size
    run = TrainingRun(files, options, {outputs.final_generator: G_NAME, outputs.final_encoder: E_NAME}, LOG_COLUMNS,
                      writer=ctx.is_main)
    finals = tuple(run.outputs)

    stopped = _early_stopped(files, options, run.changeable)
    if stopped is not None:
        restored = tuple(p for p in finals if not p.exists())
        for path in restored if ctx.is_main else ():
            run.owned.torch_save(path, stopped.models[run.outputs[path]])
        ctx.barrier()  # the other ranks return once rank 0 has restored what was missing
        return V3Result('already finished', stopped.epoch, 0, stopped.step, finals, files.folder,
                        _summaries(stopped), stopped_early=True, restored=restored)
    plan = run.plan(resume=resume, overwrite=overwrite)
    if plan.finished:
        record = plan.record
        ctx.barrier()
        return V3Result('already finished', record.epoch, record.batch, record.step, finals, files.folder,
                        _summaries(record), restored=plan.restored)
    if plan.record is None:  # a resumed run keeps its labels and CNN (both are part of its options)
        check_labels_cnn(layout, scores_csv, scores_path is not None, property_path, property_sha256)
    epoch_outputs = EpochOutputs(outputs, run.owned)
    epoch_outputs.check(range(0 if plan.record is None else plan.record.epoch, settings.epochs), overwrite)

    dataset.verify(workers=settings.workers, progress=not settings.no_progress and ctx.is_main)
    provenance = {'scores_csv': scores_csv.name, 'images': len(dataset), 'torch': torch.__version__,
                  'property_cnn_file': property_path.name, 'gender_cnn_file': gender_path.name}
    if plan.record is None:
        v1_path = main_first(ctx, lambda: fetch_input('v1_weights', layout, v1_weights))
        generator, encoder = build_v3_models(v1_path, settings.seed)
        provenance.update(v1_file=v1_path.name, v1_sha256=sha256_of(v1_path))
    else:
        generator, encoder = v3_models_from_state(plan.record.models.get(G_NAME) or {},
                                                  plan.record.models.get(E_NAME) or {}, files.resume_record)
    trainer = CVAETrainer(generator, encoder, property_model, gender_model, settings, device, ctx)
    if plan.record is not None:
        trainer.load_record(plan.record)
    run.start(plan, provenance)
    describe(ctx, f'{VERSION} fine-tuning', settings.batch_size)
    return run.train(lambda: _train(run, plan, trainer, dataset, settings, outputs, epoch_outputs), ctx, settings.tf32)


def _summaries(record: ResumeRecord) -> list[EpochSummary]:
    return [EpochSummary(**row) for row in record.extra.get('epochs', [])]


def _train(run: TrainingRun, plan: RunPlan, trainer: CVAETrainer, dataset: ScoredImageDataset,
           settings: V3Settings, outputs: V3Outputs, epoch_outputs: EpochOutputs) -> V3Result:
    record, ctx = plan.record, trainer.ctx
    epoch, batch, step, order = start_position(record)
    extra = {'loss_sum': 0.0, 'loss_count': 0, 'best_loss': None, 'best_epoch': None, 'epochs': [],
             'checkpoints': []}
    start_rngs(ctx, settings.seed, record)
    if record is not None:
        extra.update({k: record.extra[k] for k in extra if k in record.extra})
        trainer.last_checkpoint = checkpoint_kept(epoch, batch, step)
    test_settings = EpochTestSettings(num_z=settings.test_z, grid={k: tuple(v) for k, v in settings.test_grid.items()},
                                      rule=settings.rule(), num_random=settings.test_random,
                                      batch_size=TEST_BATCH_FACTOR * settings.batch_size, seed=settings.seed)
    per_epoch = len(epoch_batches(range(len(dataset)), settings.batch_size, 1, ctx.world_size))
    bar = tqdm(total=(settings.epochs - epoch) * per_epoch - batch, desc='v3 fine-tuning', unit='step',
               disable=settings.no_progress or not ctx.is_main)
    meter = Throughput(trainer.device)
    finals = tuple(run.outputs)

    def result(status, done_epoch, done_batch, **kwargs):
        return V3Result(status, done_epoch, done_batch, step, finals, run.files.folder,
                        [EpochSummary(**row) for row in extra['epochs']],
                        tuple(Path(run.files.outdir) / p for p in extra['checkpoints']), **kwargs)

    def checkpoint(next_epoch, next_batch, current_order, final=False):
        state = trainer.record(run.options, next_epoch, next_batch, step, current_order, dict(extra))
        if final:
            run.checkpoint(state)  # the final generator and encoder, the log, the record
        elif ctx.is_main:
            run.log.flush()
            save_resume_record(run.files.resume_record, state)
        trainer.last_checkpoint = checkpoint_kept(next_epoch, next_batch, step)

    try:
        with GracefulStop() as stop:
            while epoch < settings.epochs:
                if order is None:
                    order = epoch_order(settings.seed, epoch, len(dataset))
                # no minibatch-stddev: every batch is kept (one process) or trimmed to equal shares
                batches = epoch_batches(order, settings.batch_size, 1, ctx.world_size)
                lrs = trainer.set_epoch(epoch)
                loader = epoch_loader(dataset, [share(b, ctx) for b in batches[batch:]], settings.workers,
                                      trainer.device)
                meter.restart()
                done = batch  # batches of this epoch whose step is complete
                for idx, items in enumerate(stop.batches(loader), start=batch):
                    trainer.where = describe_position(epoch, idx, step + 1)
                    losses = trainer.step(items['image'], items['label'])
                    step += 1
                    done = idx + 1
                    extra['loss_sum'] += losses.total_loss
                    extra['loss_count'] += 1
                    images = len(items['index']) * ctx.world_size  # equal shares
                    row = {'epoch': epoch, 'idx': idx, **asdict(losses), 'lr_generator': lrs[0],
                           'lr_encoder': lrs[1], 'images_per_s': round(meter.tick(images), 2),
                           'peak_gpu_mem_mb': meter.peak_memory_mb()}
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f'{losses.total_loss:.3f}', img_s=f'{meter.smoothed:.1f}')
                    last = idx + 1 == len(batches)
                    stop_early = False
                    if last:
                        summary, stop_early = _end_epoch(epoch, trainer, test_settings, outputs, epoch_outputs,
                                                         extra, settings)
                        row.update(epoch_mean_loss=summary.mean_loss, passing_z=summary.passing_z,
                                   best_z=summary.best_z)
                    stopping = agree_stop(ctx, stop)  # after the epoch's test: a signal during it stops here
                    run.log.append(row)
                    if last:
                        final = epoch + 1 == settings.epochs or stop_early
                        if stop_early:
                            extra['stopped_early'] = True
                        checkpoint(epoch + 1, 0, None, final=final)
                        if stop_early:
                            return result('finished', epoch + 1, 0, stopped_early=True)
                    elif (settings.checkpoint_every and step % settings.checkpoint_every == 0) or stopping:
                        checkpoint(epoch, idx + 1, order)
                    if stopping:
                        done = (epoch + 1, 0) if last else (epoch, idx + 1)
                        return result('interrupted', *done, signal=stopping)
                    if last or settings.checkpoint_every:
                        meter.restart()
                epoch, batch, order = epoch + 1, 0, None
    except WorkersStopped:  # the stop signal killed a worker as it started: the stop, found between two steps
        if ctx.distributed:
            raise workers_stopped_error(stop, trainer.last_checkpoint) from None
        if done < len(batches):  # (after an epoch's last step, its test and checkpoint are done already)
            checkpoint(epoch, done, order)
        position = (epoch + 1, 0) if done == len(batches) else (epoch, done)
        return result('interrupted', *position, signal=stop.requested)
    finally:
        bar.close()
    return result('finished', epoch, 0)


def _end_epoch(epoch: int, trainer: CVAETrainer, test_settings: EpochTestSettings, outputs: V3Outputs,
               epoch_outputs: EpochOutputs, extra: dict, settings: V3Settings) -> tuple[EpochSummary, bool]:
    """The per-epoch test, the passing epoch's files, the epoch's summary and the patience rule. With several
    processes rank 0 tests and writes and every rank takes its outcome (the others wait meanwhile)."""
    ctx = trainer.ctx
    outcome = None
    if ctx.is_main:
        with tf32(False):  # the test decides which z are saved: full float32 whatever --tf32 and --amp say
            test = trainer.epoch_test(epoch, test_settings, outputs, progress=not settings.no_progress)
        written = epoch_outputs.write(epoch, test, cpu_state_dict(trainer.generator),
                                      cpu_state_dict(trainer.encoder))
        outcome = (test.num_passed, test.best, [p.name for p in written])
    passed, best, names = ctx.broadcast_object(outcome)
    extra['checkpoints'] = extra['checkpoints'] + names
    mean_loss = extra['loss_sum'] / max(extra['loss_count'], 1)
    summary = EpochSummary(epoch, mean_loss, passed, best)
    extra['epochs'] = extra['epochs'] + [asdict(summary)]
    if extra['best_loss'] is None or mean_loss < extra['best_loss']:
        extra['best_loss'], extra['best_epoch'] = mean_loss, epoch
    extra['loss_sum'], extra['loss_count'] = 0.0, 0
    trainer.history.clear()
    stop_early = settings.patience is not None and epoch - extra['best_epoch'] >= settings.patience
    return summary, stop_early and epoch + 1 < settings.epochs
