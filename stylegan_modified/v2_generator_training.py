"""Stage 5 v2, opt-in phase: the v1 generator trained through the property CNN (PIPELINE.md §7.3), upstream's
failed variant ("❌ not trainable", README §3-1 item 3), kept to reproduce the experiment.

**Model.** ``StyleGANGeneratorForV2`` (the v1 layout, no style mixing) starts from the v1 generator with all its
weights, v1's trained ``mapping.dense0.weight`` included; upstream deleted that weight again when loading
(PIPELINE.md §13 row 14), ``compat='upstream'`` re-randomises it (seeded). G is in train mode (its ``w_avg``
moving average updates, as upstream) and **every** G parameter trains. The property CNN scores G's images:
frozen and in eval mode by default; ``compat='upstream'`` trains it along, in train mode (dropout on), as
upstream's final code did (its freeze call was commented out; §13 row 15).

**Step groups.** One step group = ``steps_per_group`` (50) steps of ``batch_size`` (16). In group g (0-based)
each step draws z_new ~ N(0, I) and y_new ~ N(0, I) (7 values) and trains on

    z = 0.9^g * z_fixed + (1 - 0.9^g) * z_new,   y = 0.9^g * y_fixed + (1 - 0.9^g) * y_new,

a curriculum from one fixed batch (z_fixed, y_fixed, drawn once) towards fresh noise. The draws of step s come
from (seed, s) alone, so an interrupted run continues with the same batches. loss = MSE(CNN(G(z, y))[:, :6],
y[:, :6]): the six properties without background_std.

AdamW (lr 1e-5, weight decay 0.01) over G's parameters (and the CNN's in compat mode); a cosine LR per step
group with period 20 (upstream's T_max), restarted so that it never reaches 0 (``compat='upstream'``:
upstream's curve, LR 0 in groups 20, 60, ...). Early stopping: the best group is the one with the lowest mean
loss; training stops ``patience`` (100) groups after it, or at ``max_groups`` (upstream: no cap, R8). The best
group's G is written as ``stylegan_gen_fine_tuned_v2.pth`` (not published upstream).

Log (``train_log_v2.csv``, one row per step): group, idx (step in the group), step, loss, lr, mix (0.9^g),
group_loss and best_group (on a group's last step), images_per_s, peak_gpu_mem_mb. Resumable exactly like
the other trainers; a step group is the run's "epoch" (``--max-groups`` is the total).

**Several processes** (torchrun; :mod:`stylegan_modified.ddp`): ``--gen-batch-size`` is the batch of a step over
all processes; every rank draws the step's whole (z, y) batch (from (seed, step), as one process) and trains G (and
the CNN in compat mode) in DDP on its rows. ``w_avg`` follows the whole batch's mean w; the logged loss, the
group loss and early stopping use the loss averaged over the ranks. Rank 0 alone writes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ohlora.checkpoints import load_strict
from ohlora.devices import item_generator
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import V2_GENERATOR_FILE, Layout
from ohlora.resume import RESUMABLE_OPTIONS, STOPPED_EARLY, ResumeRecord
from ohlora.schedules import set_epoch_lr
from stylegan_modified.checkpoint import infer_conditional_generator_kwargs
from stylegan_modified.datasets import check_batch_size
from stylegan_modified.ddp import agree_stop, describe, distribute_generator, mean_over_ranks, rows, start_rngs, wrap
from stylegan_modified.property_cnn_training import EarlyStopping
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV2
from stylegan_modified.training_cli import CompatSettings, check_at_least
from stylegan_modified.training_control import GracefulStop, MixedPrecision, Throughput, check_finite
from stylegan_modified.training_run import (RunPlan, TrainingRun, cpu_state_dict, restore_optimizers, resume_record,
                                            start_position)

VERSION = 'v2'
GENERATOR, BEST_GENERATOR, CNN = 'generator', 'best_generator', 'property_cnn'  # names in the resume record
FIXED_STREAM, STEP_STREAM, DENSE0_STREAM = 74, 75, 76  # item_generator streams
SUPERVISED = 6        # the first six properties; background_std is not supervised
GROUP_OPTION = '--max-groups'
LOG_COLUMNS = ('group', 'idx', 'step', 'loss', 'lr', 'mix', 'group_loss', 'best_group', 'images_per_s',
               'peak_gpu_mem_mb')


@dataclass(frozen=True)
class GeneratorHyperparameters:
    lr: float = 1e-5
    weight_decay: float = 0.01     # AdamW's default, as upstream
    cosine_period: int = 20        # CosineAnnealingLR T_max, stepped per step group
    curriculum_decay: float = 0.9  # z = decay^g z_fixed + (1 - decay^g) z_new


@dataclass(frozen=True)
class V2GeneratorSettings(CompatSettings):
    """The options of the generator phase. ``v1_weights`` is the v1 file as given (relative to the root or its
    name; None: the default path); ``property_cnn`` the SHA-256 of the CNN it trains through (set by the caller)."""
    max_groups: int = 500
    patience: int = 100
    steps_per_group: int = 50
    batch_size: int = 16
    seed: int = 0
    device: str = 'cpu'
    checkpoint_every: int = 0
    amp: bool = False
    tf32: bool = False
    compat: str | None = None
    v1_weights: str | None = None
    property_cnn: str | None = None
    no_progress: bool = False
    hyper: GeneratorHyperparameters = field(default_factory=GeneratorHyperparameters)

    def check(self, world_size: int = 1) -> None:
        check_at_least((GROUP_OPTION, self.max_groups, 1), ('--gen-patience', self.patience, 1),
                       ('--steps-per-group', self.steps_per_group, 1), ('--gen-batch-size', self.batch_size, 1),
                       ('--checkpoint-every', self.checkpoint_every, 0))
        check_batch_size(self.batch_size, 1, '--gen-batch-size', world_size)  # an even split over the processes

    def options(self) -> dict:
        options = asdict(self)
        options['epochs'] = options.pop('max_groups')
        options['schedule'] = self.schedule
        options['trainer'] = 'stylegan_fine_tuning_v2_generator'
        return options


# --- the curriculum ---
def fixed_batch(seed: int, batch_size: int, z_dim: int, label_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_fixed, y_fixed), drawn once per run."""
    generator = item_generator(seed, 0, FIXED_STREAM)
    return (torch.randn(batch_size, z_dim, generator=generator),
            torch.randn(batch_size, label_size, generator=generator))


def curriculum_batch(z_fixed: torch.Tensor, y_fixed: torch.Tensor, seed: int, step: int, group: int,
                     decay: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(z, y, mix) of global step ``step`` in step group ``group``; mix = decay^group."""
    generator = item_generator(seed, step, STEP_STREAM)
    z_new = torch.randn(z_fixed.shape, generator=generator)
    y_new = torch.randn(y_fixed.shape, generator=generator)
    mix = decay ** group
    return mix * z_fixed + (1 - mix) * z_new, mix * y_fixed + (1 - mix) * y_new, mix


# --- the models ---
def v2_generator(state: dict, where: Path | str, what: str = 'v1 generator') -> StyleGANGeneratorForV2:
    """A ``StyleGANGeneratorForV2`` holding a v1-layout state_dict (widths read from its shapes)."""
    try:
        generator = StyleGANGeneratorForV2(**infer_conditional_generator_kwargs(state))
    except ValueError as exc:
        raise PipelineError(f'{where}: its {what} is not a v1-layout generator: {exc}') from None
    return load_strict(generator, state, where, what)


def rerandomise_dense0(generator: StyleGANGeneratorForV2, seed: int) -> None:
    """Upstream's v2 init (compat): a fresh ``mapping.dense0.weight`` as the constructor draws it (randn / lr_mul,
    the equalised-LR init), from its own seeded RNG."""
    dense0 = generator.mapping.dense0
    with torch.no_grad():
        fresh = torch.randn(dense0.weight.shape, generator=item_generator(seed, 0, DENSE0_STREAM)) / dense0.bscale
        dense0.weight.copy_(fresh.to(dense0.weight))


def unused_outputs(generator: StyleGANGeneratorForV2) -> list[str]:
    """The parameters of the ToRGB layers that do not make the image at the generator's lod (at lod 0 every one
    but the last block's: progressive growing's lower resolutions). They get no gradient; DDP must not wait for
    one."""
    synthesis = generator.synthesis
    lod, max_lod = float(synthesis.lod), synthesis.num_blocks - 1
    used = {f'output{block}' for block in range(synthesis.num_blocks) if abs(lod - (max_lod - block)) < 1}
    return [name for name, _ in generator.named_parameters()
            if name.startswith('synthesis.output') and name.split('.')[1] not in used]


@dataclass
class GeneratorResult:
    status: str            # 'finished', 'stopped early', 'interrupted' or 'already finished'
    groups: int            # step groups finished
    batch: int
    step: int
    best_group: int
    best_loss: float
    output: Path
    run_folder: Path
    restored: tuple[Path, ...] = ()
    signal: str | None = None

    @property
    def position(self) -> str:
        return f'step group {self.groups}, step {self.batch} (step {self.step} in all)'


class V2GeneratorTraining:
    """The generator phase of one v2 run: its run folder, checks (:meth:`plan`) and step groups (:meth:`train`)."""

    def __init__(self, layout: Layout, settings: V2GeneratorSettings, outdir: str | Path | None = None,
                 changeable: Sequence[str] = RESUMABLE_OPTIONS, ctx: DistContext | None = None):
        self.ctx = ctx if ctx is not None else DistContext(device=torch.device(settings.device))
        settings.check(self.ctx.world_size)
        self.settings = settings
        self.device = self.ctx.device
        self.files = layout.training_run(VERSION, outdir)
        self.output = self.files.checkpoint(V2_GENERATOR_FILE)
        options = {**settings.options(), 'world_size': self.ctx.world_size}
        self.run = TrainingRun(self.files, options, {self.output: BEST_GENERATOR}, LOG_COLUMNS,
                               changeable=changeable, epochs_option=GROUP_OPTION, units=('step groups', 'steps'),
                               writer=self.ctx.is_main)

    def plan(self, resume: bool, overwrite: bool = False) -> RunPlan:
        return self.run.plan(resume=resume, overwrite=overwrite)

    def finished_result(self, plan: RunPlan) -> GeneratorResult:
        record = plan.record
        stopping = EarlyStopping.from_record(self.settings.patience, record)
        return GeneratorResult('already finished', record.epoch, record.batch, record.step, stopping.best_epoch,
                               stopping.best_value, self.output, self.files.folder, plan.restored)

    def train(self, plan: RunPlan, cnn: PropertyScoreCNN, v1_state: dict | None = None,
              provenance: dict | None = None) -> GeneratorResult:
        """Train from ``plan``: a fresh run starts from ``v1_state`` (a v1 G state_dict), a resumed one from its
        record. ``cnn`` is the property CNN the run's options name."""
        record = plan.record
        where = self.files.resume_record
        if record is None:
            if v1_state is None:
                raise ValueError('a fresh v2 generator run needs the v1 weights')
            generator = v2_generator(v1_state, self.settings.v1_weights or 'the v1 generator')
            if self.settings.compat == 'upstream':
                rerandomise_dense0(generator, self.settings.seed)
        else:
            generator = v2_generator(record.models.get(GENERATOR), where, 'generator of the resume record')
            if self.settings.compat == 'upstream':  # the CNN trained along: continue from its recorded state
                state = record.models.get(CNN)
                if not isinstance(state, dict):
                    raise PipelineError(f'{where} lacks the property CNN that the compat run trains along')
                load_strict(cnn, state, where, 'property CNN of the resume record')
        trainer = _GeneratorTrainer(generator, cnn, self.settings, self.device, self.ctx)
        if record is not None:
            trainer.load_record(record, where)
        self.run.start(plan, provenance)
        describe(self.ctx, 'v2 generator', self.settings.batch_size, 'z')
        return self.run.train(lambda: self._groups(trainer, record), self.ctx, self.settings.tf32)

    def _groups(self, trainer: '_GeneratorTrainer', record: ResumeRecord | None) -> GeneratorResult:
        settings, ctx = self.settings, self.ctx
        group, batch, step, _ = start_position(record)  # a step group's "order" is its steps
        start_rngs(ctx, settings.seed, record)
        if record is not None:
            trainer.last_checkpoint = (f'the checkpoint of step group {group}, step {batch} (step {step} in all) '
                                       'is kept')
        bar = tqdm(total=(settings.max_groups - group) * settings.steps_per_group - batch, desc='v2 generator',
                   unit='step', disable=settings.no_progress or not ctx.is_main)
        meter = Throughput(self.device)

        def checkpoint(next_group, next_batch):
            self.run.checkpoint(trainer.record(self.run.options, next_group, next_batch, step))
            trainer.last_checkpoint = (f'the checkpoint of step group {next_group}, step {next_batch} '
                                       f'(step {step} in all) is kept')
            meter.restart()

        def result(status, done_group, done_batch, signal=None):
            return GeneratorResult(status, done_group, done_batch, step, trainer.stopping.best_epoch,
                                   trainer.stopping.best_value, self.output, self.files.folder, signal=signal)

        try:
            with GracefulStop() as stop:
                while group < settings.max_groups:
                    lr = trainer.set_lr(group)
                    if batch == 0:
                        trainer.extra['group_loss_sum'] = 0.0
                    meter.restart()
                    for idx in range(batch, settings.steps_per_group):
                        z, y, mix = curriculum_batch(trainer.z_fixed, trainer.y_fixed, settings.seed, step, group,
                                                     settings.hyper.curriculum_decay)
                        trainer.where = f'step group {group}, step {idx} (step {step + 1} in all)'
                        loss = trainer.step(rows(z, ctx), rows(y, ctx))
                        step += 1
                        stopping = agree_stop(ctx, stop)
                        row = {'group': group, 'idx': idx, 'step': step - 1, 'loss': loss, 'lr': lr, 'mix': mix,
                               'images_per_s': round(meter.tick(settings.batch_size), 2),
                               'peak_gpu_mem_mb': meter.peak_memory_mb()}
                        last = idx + 1 == settings.steps_per_group
                        if last:
                            group_loss = trainer.extra['group_loss_sum'] / settings.steps_per_group
                            improved = trainer.stopping.update(group, group_loss)
                            if improved and ctx.is_main:  # only rank 0 writes it
                                trainer.best_state = cpu_state_dict(trainer.generator)
                            row.update(group_loss=group_loss, best_group=trainer.stopping.best_epoch)
                        self.run.log.append(row)
                        bar.update(1)
                        bar.set_postfix(group=group, loss=f'{loss:.4f}',
                                        best=f'{trainer.stopping.best_value:.4f}@{trainer.stopping.best_epoch}')
                        if not last and ((settings.checkpoint_every and step % settings.checkpoint_every == 0)
                                         or stopping):
                            checkpoint(group, idx + 1)
                            if stopping:
                                return result('interrupted', group, idx + 1, stopping)
                    stopped = trainer.stopping.should_stop(group)
                    if stopped:
                        trainer.extra[STOPPED_EARLY] = True
                    checkpoint(group + 1, 0)
                    group, batch = group + 1, 0
                    if stopped:
                        return result('stopped early', group, 0)
                    if stop.requested:  # agreed: set on every rank by agree_stop after the group's last step
                        return result('interrupted', group, 0, stop.requested)
        finally:
            bar.close()
        return result('finished', group, 0)


class _GeneratorTrainer:
    """G, the property CNN, the optimiser, AMP, the best G and the group's sums; writes no files."""

    def __init__(self, generator: StyleGANGeneratorForV2, cnn: PropertyScoreCNN, settings: V2GeneratorSettings,
                 device: torch.device, ctx: DistContext | None = None):
        self.settings, self.device = settings, device
        self.ctx = ctx if ctx is not None else DistContext(device=torch.device(device))
        self.generator = generator.to(device).train()
        self.cnn = cnn.to(device)
        self.train_cnn = settings.compat == 'upstream'
        self.cnn.train(self.train_cnn)
        self.cnn.requires_grad_(self.train_cnn)
        self.generator.requires_grad_(True)
        unused = set(unused_outputs(self.generator))  # never get a gradient: nothing changes by saying so
        for name, parameter in self.generator.named_parameters():
            parameter.requires_grad_(name not in unused)
        # DDP around what trains: G, and the CNN when it trains along (compat); the frozen CNN is called bare
        self.generator_train = wrap(self.generator, self.ctx)
        self.cnn_train = wrap(self.cnn, self.ctx) if self.train_cnn else self.cnn
        distribute_generator(self.generator, self.ctx)
        parameters = list(self.generator.parameters()) + (list(self.cnn.parameters()) if self.train_cnn else [])
        hyper = settings.hyper
        self.optimizer = torch.optim.AdamW(parameters, lr=hyper.lr, weight_decay=hyper.weight_decay)
        self.amp = MixedPrecision(settings.amp, device, (GENERATOR,))
        self.stopping = EarlyStopping(settings.patience)
        self.best_state: dict | None = None
        self.extra: dict = {}
        self.z_fixed, self.y_fixed = fixed_batch(settings.seed, settings.batch_size, generator.z_space_dim,
                                                 generator.label_size)
        self.where = ''
        self.last_checkpoint = 'no checkpoint had been written yet'

    def set_lr(self, group: int) -> float:
        hyper = self.settings.hyper
        return set_epoch_lr(self.optimizer, [hyper.lr], group, hyper.cosine_period, self.settings.schedule)[0]

    def step(self, z: torch.Tensor, y: torch.Tensor) -> float:
        z, y = z.to(self.device), y.to(self.device)
        with self.amp.autocast():
            scores = self.cnn_train(self.generator_train(z, y)['image'])
        loss = F.mse_loss(scores.float()[:, :SUPERVISED], y[:, :SUPERVISED])
        value, = mean_over_ranks(self.ctx, loss)  # the whole batch's loss: the same stop and best group everywhere
        check_finite(self.where, self.last_checkpoint, loss=value)
        self.amp.step(GENERATOR, loss, self.optimizer)
        self.extra['group_loss_sum'] = self.extra.get('group_loss_sum', 0.0) + value
        return value

    def record(self, options: dict, group: int, batch: int, step: int) -> ResumeRecord | None:
        """The resume record (every rank calls it: the RNG states are gathered); None on ranks other than 0."""
        # load_resume_record wants an order inside an epoch; a step group's "order" is its steps.
        return resume_record(self.ctx, options, group, batch, step, torch.arange(self.settings.steps_per_group),
                             self._record_contents)

    def _record_contents(self) -> dict:
        models = {GENERATOR: cpu_state_dict(self.generator)}
        if self.best_state is not None:
            models[BEST_GENERATOR] = self.best_state
        if self.train_cnn:
            models[CNN] = cpu_state_dict(self.cnn)
        return dict(models=models, optimizers={GENERATOR: self.optimizer.state_dict()}, scalers=self.amp.state_dict(),
                    extra={**self.extra, 'early_stopping': self.stopping.state()})

    def load_record(self, record: ResumeRecord, where: Path) -> None:
        restore_optimizers(record, {GENERATOR: self.optimizer}, self.amp,
                           f'{where}: its optimiser state does not fit the models')
        self.stopping = EarlyStopping.from_record(self.settings.patience, record)
        self.extra = {k: v for k, v in record.extra.items() if k != 'early_stopping'}
        self.best_state = record.models.get(BEST_GENERATOR)
