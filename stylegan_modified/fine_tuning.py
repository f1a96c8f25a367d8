"""Stage 5 v1: conditional fine-tuning of GenForce's StyleGAN G and D on the 7 property scores (PIPELINE.md §7.2).

**Init.** G and D start from the GenForce zoo file (entries ``generator`` and ``discriminator``; widths read from
the shapes). As upstream, ``mapping.dense0.weight`` (its fan-in grows from 512 to 512 + 16 for the label
embedding) and D's ``layer14`` (now (512 + 7) -> 1) are dropped and everything else loaded; so dense0.weight,
``mapping.label_weight`` and layer14 start random (layer14.bias 0), drawn from a generator seeded by ``--seed``.
``init='warm'`` copies the pretrained dense0 weight into the z columns of the new one and zeros the 16 label
columns. The runtime weight scale of dense0 drops by sqrt(512/528) with the wider fan-in, and the pixel norm,
now over [z, embedding], scales the normalised z up by exactly sqrt(528/512) when the embedding is 0; the two
cancel, so the stored weights are copied unchanged and, for a zero embedding, w equals the pretrained
mapping's w up to float rounding. For a real label the embedding takes its share of the pixel norm and z's
contribution shrinks by |z| / sqrt(|z|^2 + |e|^2): "approximately preserved", as the spec says.

**Trainable parts.** G: every ``mapping.*`` parameter. D: the last three layers (``layer12``, ``layer13``,
``layer14`` at 256x256). ``requires_grad`` is set again at every step: the D subset in the D step, the G
subset in the G step; everything else never changes (buffers too, except G's ``truncation.w_avg``, which the
train-mode G call moving-averages, as upstream).

**One step** (:meth:`V1Trainer.step`):

1. D step: fakes = G(z, y) (train mode: w_avg update, style mixing with ``style_mixing_prob``, random noise),
   z ~ N(0, I) from torch's CPU RNG, y = the real batch's labels. d_loss = mean softplus(D(fake, y)) + mean
   softplus(-D(real, y)) + R1, R1 = gamma/2 * mean over the batch of the squared input-gradient norm of
   D(real, y), gamma = 10.
2. G steps: g_loss = mean softplus(-D(G(z', y), y)) with a fresh z' each; repeated while g_loss >= 2 * d_loss,
   at most 4 (``g_train_count`` in the log).

AdamW (lr 1e-4, betas 0.9/0.999, weight decay 0.01) for each, constant LR (upstream's scheduler was never
stepped, R9); the optimisers hold the trainable parameters only (equivalent: AdamW skips parameters
without gradients, weight decay included).

**Log columns** (``train_log.csv``, one row per step, no index column): epoch, idx (batch in the epoch),
d_loss (with R1), g_loss (the last G step's), g_train_count, real_scores_mean / fake_scores_mean (the mean raw
D logit of the D step's reals / fakes), real_fake_auroc (the probability that a real's logit exceeds a fake's,
ties 1/2; empty when undefined), images_per_s (real images of the step / its wall time), peak_gpu_mem_mb
(empty on CPU).

**Several processes** (torchrun; :mod:`stylegan_modified.ddp`): ``--batch-size`` is the batch of a step over all
processes, each rank's share is a multiple of D's minibatch-stddev group on its own (the groups stay per rank);
G's mapping and D's last layers are each in a DDP wrapper that the step calls only where they train (G in the G
steps, D in the D step; the other model is called bare). The alternation compares the losses averaged over the
ranks, so every rank takes the same number of G steps, and the log holds those averages (the AUROC over all
ranks' logits); ``w_avg`` follows the mean w of the whole batch. Rank 0 alone writes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ohlora.checkpoints import load_strict, read_checkpoint, state_dict_mismatch
from ohlora.constants import IMAGE_SIZE, LABEL_SIZE
from ohlora.devices import item_generator
from ohlora.distributed import DistContext
from ohlora.errors import PipelineError
from ohlora.layout import DISCRIMINATOR_FILES, GENERATOR_FILES, GENFORCE_ZOO_FILE, Layout
from ohlora.records import sha256_of
from ohlora.resume import ResumeRecord
from ohlora.weights import fetch
from stylegan.checkpoint import infer_discriminator_kwargs, infer_generator_kwargs, unwrap_zoo_checkpoint
from stylegan_modified.checkpoint import (describe_checkpoint, infer_conditional_discriminator_kwargs,
                                          infer_conditional_generator_kwargs)
from stylegan_modified.datasets import (ScoredImageDataset, check_batch_size, epoch_batches, epoch_order,
                                        minibatch_std_group_size)
from stylegan_modified.ddp import (agree_stop, describe, distribute_generator, gather, main_first, mean_over_ranks,
                                   share, start_rngs, training_context, wrap)
from stylegan_modified.monitoring import MonitoringGrid
from stylegan_modified.stylegan_discriminator import MINIBATCH_STD_GROUP_SIZE, StyleGANDiscriminator
from stylegan_modified.stylegan_generator import StyleGANGenerator
from stylegan_modified.training_cli import check_at_least
from stylegan_modified.training_control import (GracefulStop, MixedPrecision, Throughput, WorkersStopped, check_finite,
                                                epoch_loader, workers_stopped_error)
from stylegan_modified.training_run import (RunPlan, TrainingRun, checkpoint_kept, cpu_state_dict, describe_position,
                                            restore_optimizers, resume_record, start_position)

VERSION = 'v1'
LABEL_CONVERT_DIM = 16
INITS = ('upstream', 'warm')
INIT_STREAM = 51  # item_generator stream of the random init (dense0.weight, label_weight, layer14)
ZOO_MODEL = Path(GENFORCE_ZOO_FILE).stem
ZOO_WHAT = f'GenForce StyleGAN zoo checkpoint ({GENFORCE_ZOO_FILE})'
LOG_COLUMNS = ('epoch', 'idx', 'd_loss', 'g_loss', 'g_train_count', 'real_scores_mean', 'fake_scores_mean',
               'real_fake_auroc', 'images_per_s', 'peak_gpu_mem_mb')
G_NAME, D_NAME = 'generator', 'discriminator'


@dataclass(frozen=True)
class Hyperparameters:
    """Upstream's fixed v1 settings; recorded with the options so a record says what it was trained with."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    r1_gamma: float = 10.0
    max_g_steps: int = 4
    g_loss_ratio: float = 2.0
    w_moving_decay: float = 0.995


@dataclass(frozen=True)
class FineTuningSettings:
    """The options of a v1 run; ``device`` is the resolved device. ``weights``/``scores`` are filled in by
    :func:`fine_tune` from its paths (relative to the root, or a file name; None: the layout's zoo file /
    ``all_scores.csv``)."""
    epochs: int
    batch_size: int = 16
    workers: int = 2
    seed: int = 0
    device: str = 'cpu'
    init: str = 'upstream'
    style_mixing_prob: float = 0.9
    snapshot_every: int = 10
    snapshot_z: int = 10
    snapshot_size: int = 128
    checkpoint_every: int = 0
    amp: bool = False
    tf32: bool = False
    weights: str | None = None
    scores: str | None = None
    compat: str | None = None
    no_progress: bool = False
    hyper: Hyperparameters = field(default_factory=Hyperparameters)

    def check(self, world_size: int = 1) -> None:
        """One line per option a user can get wrong (before anything is read or written)."""
        check_at_least(('--epochs', self.epochs, 1))
        if self.init not in INITS:
            raise PipelineError(f'--init must be one of {", ".join(INITS)}, got {self.init!r}')
        if not (math.isfinite(self.style_mixing_prob) and 0.0 <= self.style_mixing_prob <= 1.0):
            raise PipelineError(f'--style-mixing-prob must be in [0, 1], got {self.style_mixing_prob}')
        check_at_least(('--snapshot-every', self.snapshot_every, 0), ('--checkpoint-every', self.checkpoint_every, 0),
                       ('--workers', self.workers, 0), ('--snapshot-z', self.snapshot_z, 1),
                       ('--snapshot-size', self.snapshot_size, 16), ('--batch-size', self.batch_size, 1))
        # again with the D's own group, once built
        check_batch_size(self.batch_size, MINIBATCH_STD_GROUP_SIZE, world_size=world_size)

    def options(self) -> dict:
        """The resolved options as plain JSON types (what training_options.json and the record hold)."""
        options = asdict(self)
        options['hyper']['betas'] = list(options['hyper']['betas'])
        options['trainer'] = f'stylegan_fine_tuning_{VERSION}'
        return options


# --- models ---
def generator_trainable(name: str) -> bool:
    return name.startswith('mapping.')


def discriminator_trainable_layers(discriminator: StyleGANDiscriminator) -> tuple[str, ...]:
    """The 4x4 minibatch-std conv, the dense layer and the label head: layer12-14 at 256x256."""
    last = 2 * discriminator.num_blocks
    return tuple(f'layer{k}' for k in (last - 2, last - 1, last))


def discriminator_trainable(discriminator: StyleGANDiscriminator) -> Callable[[str], bool]:
    layers = set(discriminator_trainable_layers(discriminator))
    return lambda name: name.split('.')[0] in layers


def set_trainable(module: torch.nn.Module, predicate: Callable[[str], bool] | bool) -> None:
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(predicate if isinstance(predicate, bool) else predicate(name))


def _zoo_state_dicts(path: Path) -> tuple[dict, dict]:
    raw = read_checkpoint(path, ZOO_WHAT)
    obj = unwrap_zoo_checkpoint(raw)
    entries = [obj.get(G_NAME), obj.get(D_NAME)]
    if not all(isinstance(e, dict) and e and all(isinstance(v, torch.Tensor) for v in e.values()) for e in entries):
        description, _ = describe_checkpoint(raw)
        raise PipelineError(f'{path} is {description}; fine-tuning starts from a {ZOO_WHAT} with tensor entries '
                            f'{G_NAME!r} and {D_NAME!r}')
    return entries[0], entries[1]


def _load_partial(model: torch.nn.Module, source: dict, fresh: set[str], path: Path, what: str) -> None:
    """``load_state_dict(strict=False)`` as upstream, but only ``fresh`` may be missing and nothing may not fit."""
    problem = state_dict_mismatch(model, {**{k: v for k, v in model.state_dict().items() if k in fresh}, **source})
    if problem:
        raise PipelineError(f'{path}: the {what} does not fit the conditional model: {problem}')
    missing, unexpected = model.load_state_dict(source, strict=False)
    assert set(missing) == fresh and not unexpected, (missing, unexpected)


def warm_start_dense0(generator: StyleGANGenerator, pretrained: torch.Tensor) -> None:
    """``--init warm``: the pretrained [512, 512] weight into the z columns, the label columns zero (see the
    module docstring for why no rescaling is needed)."""
    with torch.no_grad():
        weight = generator.mapping.dense0.weight
        weight.zero_()
        weight[:, :generator.z_space_dim] = pretrained


def build_models(zoo_path: str | Path, init: str = 'upstream', seed: int = 0) -> tuple[StyleGANGenerator,
                                                                                        StyleGANDiscriminator]:
    """The v1 G and D (CPU, train mode) initialised from a GenForce zoo file as upstream (or ``init='warm'``)."""
    path = Path(zoo_path)
    g_source, d_source = _zoo_state_dicts(path)
    try:
        g_kwargs, d_kwargs = infer_generator_kwargs(g_source), infer_discriminator_kwargs(d_source)
    except ValueError as exc:
        raise PipelineError(f'{path} is not a GenForce StyleGAN zoo checkpoint: {exc}') from None
    if g_kwargs['label_size'] or d_kwargs['label_size']:
        raise PipelineError(f'{path} holds a label-conditioned GenForce model; fine-tuning starts from an '
                            f'unconditional one ({ZOO_MODEL})')
    for name, kwargs in ((G_NAME, g_kwargs), (D_NAME, d_kwargs)):
        if kwargs['resolution'] != IMAGE_SIZE:
            raise PipelineError(f'{path}: its {name} is for {kwargs["resolution"]}x{kwargs["resolution"]} images; '
                                f'v1 fine-tunes the {IMAGE_SIZE}x{IMAGE_SIZE} model ({ZOO_MODEL}) on the '
                                f'{IMAGE_SIZE}x{IMAGE_SIZE} filtered images')
    for name, source, key in ((G_NAME, g_source, 'synthesis.lod'), (D_NAME, d_source, 'lod')):
        lod = source.get(key)
        if isinstance(lod, torch.Tensor) and lod.numel() == 1 and float(lod) != 0:
            raise PipelineError(f'{path}: its {name} has lod {float(lod):g}, a progressive-growing snapshot that '
                                'does not yet produce full-resolution images; use a finished model (lod 0)')
    g_kwargs.update(label_size=LABEL_SIZE, label_convert_dim=LABEL_CONVERT_DIM)
    d_kwargs.update(label_size=LABEL_SIZE)
    # The random tensors (dense0.weight, label_weight, layer14) are drawn by the constructors, in a forked RNG
    # seeded from --seed, so the global streams (seeded separately for training) are left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_generator(seed, 0, INIT_STREAM).initial_seed())
        generator = StyleGANGenerator(**g_kwargs)
        discriminator = StyleGANDiscriminator(**d_kwargs)
    final = discriminator.final_layer_name
    _load_partial(generator, {k: v for k, v in g_source.items() if k != 'mapping.dense0.weight'},
                  {'mapping.dense0.weight', 'mapping.label_weight'}, path, f'{G_NAME!r} entry')
    _load_partial(discriminator, {k: v for k, v in d_source.items() if not k.startswith(final + '.')},
                  {f'{final}.weight', f'{final}.bias'}, path, f'{D_NAME!r} entry')
    if init == 'warm':
        warm_start_dense0(generator, g_source['mapping.dense0.weight'])
    return generator.train(), discriminator.train()


def models_from_record(record: ResumeRecord, where: Path) -> tuple[StyleGANGenerator, StyleGANDiscriminator]:
    g_state, d_state = record.models.get(G_NAME), record.models.get(D_NAME)
    if not isinstance(g_state, dict) or not isinstance(d_state, dict):
        raise PipelineError(f'{where} lacks the {G_NAME} or {D_NAME} weights')
    try:
        generator = StyleGANGenerator(**infer_conditional_generator_kwargs(g_state))
        discriminator = StyleGANDiscriminator(**infer_conditional_discriminator_kwargs(d_state))
    except ValueError as exc:
        raise PipelineError(f'{where}: its weights are not a v1 G/D: {exc}') from None
    load_strict(generator, g_state, where, f'v1 {G_NAME}')
    load_strict(discriminator, d_state, where, f'v1 {D_NAME}')
    return generator.train(), discriminator.train()


# --- losses ---
def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, reals: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma/2 * mean over the batch of the squared gradient norm (summed over each image's pixels)."""
    gradient, = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
    return gradient.square().sum(dim=[1, 2, 3]).mean() * (gamma * 0.5)


def real_fake_auroc(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """P(real logit > fake logit) + 1/2 P(equal); None when a side is empty or not finite."""
    real, fake = real.detach().double().flatten().cpu(), fake.detach().double().flatten().cpu()
    if not len(real) or not len(fake) or not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        return None
    greater = (real[:, None] > fake[None, :]).double().sum()
    ties = (real[:, None] == fake[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(real) * len(fake)))


def alternate_g_steps(g_step: Callable[[], float], d_loss: float, max_steps: int = 4,
                      ratio: float = 2.0) -> tuple[int, float]:
    """Run ``g_step`` (returns its g_loss) until g_loss < ratio * d_loss, at most ``max_steps`` times.

    Returns (number of G steps, the last g_loss).
    """
    count, g_loss = 0, math.inf
    while count < max_steps:
        g_loss = g_step()
        count += 1
        if g_loss < ratio * d_loss:
            break
    return count, g_loss


@dataclass
class StepResult:
    d_loss: float
    g_loss: float
    g_train_count: int
    real_scores_mean: float
    fake_scores_mean: float
    real_fake_auroc: float | None


class V1Trainer:
    """G, D, their optimisers and the v1 step; holds no data and writes no files. With several processes
    (``ctx``) a step trains on this rank's share of the batch; ``g_train``/``d_train`` are the DDP wrappers."""

    def __init__(self, generator: StyleGANGenerator, discriminator: StyleGANDiscriminator,
                 settings: FineTuningSettings, device: torch.device, ctx: DistContext | None = None):
        self.generator, self.discriminator = generator.to(device).train(), discriminator.to(device).train()
        self.settings, self.hyper, self.device = settings, settings.hyper, device
        self.ctx = ctx if ctx is not None else DistContext(device=torch.device(device))
        self.d_trainable = discriminator_trainable(discriminator)
        # DDP syncs the parameters that require gradients when it is built: the trainable subsets.
        set_trainable(self.generator, generator_trainable)
        set_trainable(self.discriminator, self.d_trainable)
        self.g_train, self.d_train = wrap(self.generator, self.ctx), wrap(self.discriminator, self.ctx)
        distribute_generator(self.generator, self.ctx)
        g_params = [p for n, p in generator.named_parameters() if generator_trainable(n)]
        d_params = [p for n, p in discriminator.named_parameters() if self.d_trainable(n)]
        optimizer = dict(lr=self.hyper.lr, betas=self.hyper.betas, weight_decay=self.hyper.weight_decay)
        self.g_optimizer = torch.optim.AdamW(g_params, **optimizer)
        self.d_optimizer = torch.optim.AdamW(d_params, **optimizer)
        self.amp = MixedPrecision(settings.amp, device, (G_NAME, D_NAME))
        self.where = ''                      # for messages: 'epoch E, batch B (step S)'
        self.last_checkpoint = 'no checkpoint had been written yet'

    def generate_fakes(self, labels: torch.Tensor, generator: torch.nn.Module | None = None) -> torch.Tensor:
        """G(z, labels) as in upstream training: train mode, style mixing, random noise; z from the CPU RNG.
        ``generator``: G or its DDP wrapper (default G)."""
        z = torch.randn(labels.shape[0], self.generator.z_space_dim).to(self.device)
        return (generator or self.generator)(z, labels, w_moving_decay=self.hyper.w_moving_decay,
                                             style_mixing_prob=self.settings.style_mixing_prob, trunc_psi=1.0,
                                             trunc_layers=0, randomize_noise=True)['image']

    def d_step(self, reals: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        set_trainable(self.generator, False)
        set_trainable(self.discriminator, self.d_trainable)
        with torch.no_grad(), self.amp.autocast():
            fakes = self.generate_fakes(labels)
        reals = reals.detach().requires_grad_(True)
        real_logits = self.d_train(reals, labels)  # float32 even with --amp: R1 needs it
        r1 = r1_penalty(real_logits, reals, self.hyper.r1_gamma)
        with self.amp.autocast():
            fake_logits = self.d_train(fakes, labels).float()
        d_loss = d_logistic_loss(real_logits, fake_logits) + r1
        # every rank sees the same mean: the same NaN stop and, in step(), the same G/D alternation
        d_loss_mean, = mean_over_ranks(self.ctx, d_loss)
        check_finite(self.where, self.last_checkpoint, d_loss=d_loss_mean)
        self.amp.step(D_NAME, d_loss, self.d_optimizer)
        return d_loss_mean, real_logits.detach(), fake_logits.detach()

    def g_step(self, labels: torch.Tensor) -> float:
        set_trainable(self.discriminator, False)
        set_trainable(self.generator, generator_trainable)
        with self.amp.autocast():
            g_loss = g_nonsaturating_loss(self.discriminator(self.generate_fakes(labels, self.g_train),
                                                             labels).float())
        g_loss_mean, = mean_over_ranks(self.ctx, g_loss)
        check_finite(self.where, self.last_checkpoint, g_loss=g_loss_mean)
        self.amp.step(G_NAME, g_loss, self.g_optimizer)
        return g_loss_mean

    def step(self, reals: torch.Tensor, labels: torch.Tensor) -> StepResult:
        reals, labels = reals.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        d_loss, real_logits, fake_logits = self.d_step(reals, labels)
        count, g_loss = alternate_g_steps(lambda: self.g_step(labels), d_loss, self.hyper.max_g_steps,
                                          self.hyper.g_loss_ratio)
        real_mean, fake_mean = mean_over_ranks(self.ctx, real_logits.mean(), fake_logits.mean())
        return StepResult(d_loss, g_loss, count, real_mean, fake_mean,
                          real_fake_auroc(gather(self.ctx, real_logits), gather(self.ctx, fake_logits)))

    def record(self, options: dict, epoch: int, batch: int, step: int,
               order: torch.Tensor | None) -> ResumeRecord | None:
        """The resume record (every rank calls it: the RNG states are gathered); None on ranks other than 0."""
        return resume_record(self.ctx, options, epoch, batch, step, order, lambda: dict(
            models={G_NAME: cpu_state_dict(self.generator), D_NAME: cpu_state_dict(self.discriminator)},
            optimizers={G_NAME: self.g_optimizer.state_dict(), D_NAME: self.d_optimizer.state_dict()},
            scalers=self.amp.state_dict()))

    def restore_optimizers(self, record: ResumeRecord) -> None:
        restore_optimizers(record, {G_NAME: self.g_optimizer, D_NAME: self.d_optimizer}, self.amp,
                           'the resume record\'s optimiser states do not fit the models')


# --- the run ---
@dataclass
class FineTuningResult:
    status: str                  # 'finished', 'interrupted' or 'already finished'
    epoch: int                   # epochs finished (or in progress when interrupted)
    batch: int
    step: int
    outputs: tuple[Path, ...]
    run_folder: Path
    restored: tuple[Path, ...] = ()
    signal: str | None = None

    def lines(self) -> list[str]:
        """What the script prints: on stderr when the run was interrupted (it then exits 130), else on stdout."""
        names = ', '.join(str(p) for p in self.outputs)
        if self.status == 'already finished':
            restored = f'; restored the missing {", ".join(p.name for p in self.restored)}' if self.restored else ''
            return [f'{self.run_folder} already holds a finished run of {self.epoch} epochs; nothing to '
                    f'do{restored} (--resume --epochs N to extend it)']
        if self.status == 'interrupted':
            return [f'stopped by {self.signal} at epoch {self.epoch}, batch {self.batch} (step {self.step}); the '
                    f'checkpoint is complete ({names}); continue with --resume']
        return [f'fine-tuned {VERSION} for {self.epoch} epochs ({self.step} steps): {names}; log and snapshots in '
                f'{self.run_folder}']


def fine_tune(layout: Layout, settings: FineTuningSettings, *, weights_path: str | Path | None = None,
              scores_path: str | Path | None = None, outdir: str | Path | None = None, resume: bool = False,
              overwrite: bool = False, ctx: DistContext | None = None) -> FineTuningResult:
    """Train (or continue, or confirm finished) the v1 run of ``layout`` / ``outdir``; see the module docstring.

    Everything a user can get wrong is checked before anything is written: the options, the run folder's
    state, the published files, the scores CSV, every image, the zoo file. ``ctx``: this process among those
    of a torchrun (default: read from the environment; one process without torchrun).
    """
    # The input files are recorded as given (relative to the root, or their name alone: R4), None for the defaults.
    settings = replace(settings, weights=None if weights_path is None else layout.relative(Path(weights_path)),
                       scores=None if scores_path is None else layout.relative(Path(scores_path)))
    ctx = ctx if ctx is not None else training_context(torch.device(settings.device))
    settings.check(ctx.world_size)
    device = ctx.device
    scores_csv = Path(scores_path) if scores_path is not None else layout.property_scores_csv(1)
    dataset = ScoredImageDataset.filtered(layout, scores_csv, image_size=(IMAGE_SIZE, IMAGE_SIZE))
    files = layout.training_run(VERSION, outdir)
    outputs = {files.checkpoint(GENERATOR_FILES[VERSION]): G_NAME,
               files.checkpoint(DISCRIMINATOR_FILES[VERSION]): D_NAME}
    options = settings.options()
    options['data'] = {'images': len(dataset), 'fingerprint': dataset.fingerprint()}
    options['world_size'] = ctx.world_size
    run = TrainingRun(files, options, outputs, LOG_COLUMNS, writer=ctx.is_main)
    plan = run.plan(resume=resume, overwrite=overwrite)
    if plan.finished:
        record = plan.record
        ctx.barrier()  # the other ranks return once rank 0 has restored what was missing
        return FineTuningResult('already finished', record.epoch, record.batch, record.step, tuple(outputs),
                                files.folder, plan.restored)

    dataset.verify(workers=settings.workers, progress=not settings.no_progress and ctx.is_main)
    provenance = {'scores_csv': scores_csv.name, 'images': len(dataset), 'torch': torch.__version__}
    if plan.record is None:
        zoo = main_first(ctx, lambda: fetch('genforce_stylegan256', layout, weights_path))
        generator, discriminator = build_models(zoo, settings.init, settings.seed)
        provenance.update(zoo_file=zoo.name, zoo_sha256=sha256_of(zoo))
    else:
        generator, discriminator = models_from_record(plan.record, files.resume_record)
    group = minibatch_std_group_size(discriminator)
    check_batch_size(settings.batch_size, group, world_size=ctx.world_size)

    trainer = V1Trainer(generator, discriminator, settings, device, ctx)
    if plan.record is not None:
        trainer.restore_optimizers(plan.record)
    run.start(plan, provenance)
    describe(ctx, f'{VERSION} fine-tuning', settings.batch_size)
    return run.train(lambda: _train(run, plan, trainer, dataset, settings, group), ctx, settings.tf32)


def _train(run: TrainingRun, plan: RunPlan, trainer: V1Trainer, dataset: ScoredImageDataset,
           settings: FineTuningSettings, group: int) -> FineTuningResult:
    record, ctx = plan.record, trainer.ctx
    epoch, batch, step, order = start_position(record)
    start_rngs(ctx, settings.seed, record)
    if record is not None:
        trainer.last_checkpoint = checkpoint_kept(epoch, batch, step)
    grid = MonitoringGrid(trainer.generator.z_space_dim, settings.seed, settings.snapshot_z,
                          cell_size=settings.snapshot_size) if settings.snapshot_every and ctx.is_main else None
    per_epoch = len(epoch_batches(range(len(dataset)), settings.batch_size, group, ctx.world_size))
    bar = tqdm(total=(settings.epochs - epoch) * per_epoch - batch, desc='v1 fine-tuning',
               unit='step', disable=settings.no_progress or not ctx.is_main)
    meter = Throughput(trainer.device)
    outputs = tuple(run.outputs)

    def checkpoint(next_epoch, next_batch, current_order):
        run.checkpoint(trainer.record(run.options, next_epoch, next_batch, step, current_order))
        trainer.last_checkpoint = checkpoint_kept(next_epoch, next_batch, step)

    try:
        with GracefulStop() as stop:
            while epoch < settings.epochs:
                if order is None:
                    order = epoch_order(settings.seed, epoch, len(dataset))
                batches = epoch_batches(order, settings.batch_size, group, ctx.world_size)
                loader = epoch_loader(dataset, [share(b, ctx) for b in batches[batch:]], settings.workers,
                                      trainer.device)
                meter.restart()
                done = batch  # batches of this epoch whose step is complete
                for idx, items in enumerate(stop.batches(loader), start=batch):
                    trainer.where = describe_position(epoch, idx, step + 1)
                    result = trainer.step(items['image'], items['label'])
                    step += 1
                    done = idx + 1
                    rate = meter.tick(len(items['index']) * ctx.world_size)  # equal shares
                    stopping = agree_stop(ctx, stop)
                    run.log.append({'epoch': epoch, 'idx': idx, 'd_loss': result.d_loss, 'g_loss': result.g_loss,
                                    'g_train_count': result.g_train_count,
                                    'real_scores_mean': result.real_scores_mean,
                                    'fake_scores_mean': result.fake_scores_mean,
                                    'real_fake_auroc': result.real_fake_auroc, 'images_per_s': round(rate, 2),
                                    'peak_gpu_mem_mb': meter.peak_memory_mb()})
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, d_loss=f'{result.d_loss:.3f}', g_loss=f'{result.g_loss:.3f}',
                                    g_n=result.g_train_count, img_s=f'{meter.smoothed:.1f}')
                    paused = False
                    if grid is not None and idx % settings.snapshot_every == 0:
                        grid.write(trainer.generator, run.files.snapshot(epoch, idx),
                                   f'v1 fine-tuning: epoch {epoch}, batch {idx} (step {step}), seed {settings.seed}')
                        paused = True
                    if idx + 1 == len(batches):
                        checkpoint(epoch + 1, 0, None)
                        paused = True
                    elif (settings.checkpoint_every and step % settings.checkpoint_every == 0) or stopping:
                        checkpoint(epoch, idx + 1, order)
                        paused = True
                    if stopping:
                        position = (epoch + 1, 0) if idx + 1 == len(batches) else (epoch, idx + 1)
                        return FineTuningResult('interrupted', *position, step, outputs, run.files.folder,
                                                signal=stopping)
                    if paused:
                        meter.restart()
                epoch, batch, order = epoch + 1, 0, None
    except WorkersStopped:  # the stop signal killed a worker as it started: the stop, found between two steps
        if ctx.distributed:
            raise workers_stopped_error(stop, trainer.last_checkpoint) from None
        if done < len(batches):  # (after an epoch's last step, its checkpoint is written already)
            checkpoint(epoch, done, order)
        position = (epoch + 1, 0) if done == len(batches) else (epoch, done)
        return FineTuningResult('interrupted', *position, step, outputs, run.files.folder, signal=stop.requested)
    finally:
        bar.close()
    return FineTuningResult('finished', epoch, 0, step, outputs, run.files.folder)
