"""Stage 1 from end to end (``run_original_generator.py``): sample images from the GenForce StyleGAN, or import
the published set; return the report.

Every option and the output folder are checked before the weights are fetched or loaded. Under torchrun every rank
renders its share and rank 0 merges; with ``--shard i/n`` each job renders its share and
:func:`merge_stage1_shards` (``merge_shards.py --stage 1``) writes the meta and the z record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ohlora.amp import amp_setting
from ohlora.cli import check_float
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import MAX_IMAGES, Layout
from ohlora.records import weights_digest
from ohlora.sharding import check_shard_option, merge_command, start
from ohlora.weights import fetch
from stylegan.checkpoint import load_generator
from stylegan.sampling import (SamplingRecipe, check_outputs, existing_images, import_published, merge_shards,
                               sample_images)

UPSTREAM_STYLE_MIXING_PROB = 0.9


@dataclass(frozen=True)
class Stage1Request:
    root: str | Path | None = None
    num: int = 10_000
    weights: str | Path | None = None      # GenForce zoo checkpoint (default: the published one)
    generator_key: str = 'generator'
    trunc_psi: float = 1.0
    trunc_layers: int = 0
    style_mixing_prob: float | None = None  # None: 0, or upstream's 0.9 with compat
    published: bool = False                 # import the published images instead of sampling
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    compat: bool = False
    progress: bool = True
    shard: str | None = None                # 'i/n': this job's share of a split run (then merge the shards)
    amp: bool = False                       # bfloat16 autocast (recorded in the meta)


@dataclass
class Stage1Report:
    layout: Layout
    written: int
    num: int | None = None       # None: the published set was imported
    shard: str | None = None     # a --shard job: its share ('i/n'); the merge is still to come
    processes: int = 1           # torchrun: the ranks that rendered (the report is rank 0's)
    quiet: bool = False          # a torchrun rank other than 0 prints nothing

    def lines(self) -> list[str]:
        layout = self.layout
        if self.quiet:
            return []
        if self.num is None:
            return [f'imported {self.written} published images into {layout.synthesized_dir}']
        if self.shard is not None:
            return [f'shard {self.shard}: wrote {self.written} images into {layout.synthesized_dir}; once every shard '
                    f'has finished, merge them: {merge_command("1", layout.root)}']
        ranks = f' ({self.processes} processes)' if self.processes > 1 else ''
        return [f'wrote {self.written} images ({self.num - self.written} already there) into '
                f'{layout.synthesized_dir}{ranks}; z record: {layout.synthesized_z_csv}']


def merge_stage1_shards(root: str | Path | None) -> list[str]:
    """``merge_shards.py --stage 1``: the meta and z record of a split run (see :func:`stylegan.sampling.merge_shards`)."""
    layout = Layout(root)
    num, shards = merge_shards(layout)
    return [f'merged {shards} shards: {num} images in {layout.synthesized_dir}; z record: {layout.synthesized_z_csv}']


def run_stage1(request: Stage1Request) -> Stage1Report:
    """Write the stage-1 images 0..num-1 that are missing (or import the published ones)."""
    layout = Layout(request.root)
    if request.published:
        if request.shard is not None:
            raise PipelineError('--published imports the whole published set in one job; drop --shard')
        return Stage1Report(layout, import_published(layout))
    if not 1 <= request.num <= MAX_IMAGES:
        raise PipelineError(f'--num must be in [1, {MAX_IMAGES}] (image names have six digits), got {request.num}')
    check_float('--trunc-psi', request.trunc_psi)
    if request.trunc_layers < 0:
        raise PipelineError(f'--trunc-layers must be 0 or more, got {request.trunc_layers}')
    mixing = request.style_mixing_prob
    if mixing is None:
        mixing = UPSTREAM_STYLE_MIXING_PROB if request.compat else 0.0
    check_float('--style-mixing-prob', mixing, 0.0, 1.0)
    check_shard_option(request.shard)
    check_outputs(layout)
    existing_images(layout.synthesized_dir)

    sharding = start(resolve_device(request.device), request.shard)
    device = sharding.ctx.device
    disable_tf32()
    weights = fetch('genforce_stylegan256', layout, request.weights)
    generator = load_generator(weights, key=request.generator_key, device=device)
    if request.trunc_layers > generator.num_layers:
        raise PipelineError(f'--trunc-layers {request.trunc_layers} exceeds the {generator.num_layers} layers of the '
                            f'generator in {weights}')
    recipe = SamplingRecipe(seed=request.seed, weights_sha256=weights_digest(weights),
                            generator_key=request.generator_key, trunc_psi=request.trunc_psi,
                            trunc_layers=request.trunc_layers, style_mixing_prob=mixing,
                            z_dim=generator.z_space_dim, num_layers=generator.num_layers,
                            amp=amp_setting(request.amp))
    written = sample_images(generator, layout, recipe, request.num, request.batch_size, progress=request.progress,
                            weights_file=weights.name, shard=sharding.shard)
    if sharding.torchrun:
        written = sharding.total(written)
        sharding.finish(lambda: merge_shards(layout))
        return Stage1Report(layout, written, request.num, processes=sharding.ctx.world_size,
                            quiet=not sharding.ctx.is_main)
    return Stage1Report(layout, written, request.num, shard=str(sharding.shard) if sharding.active else None)
