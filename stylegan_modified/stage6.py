"""Stage 6 from end to end (``run_fine_tuned_generator.py``): check the options, load the generator and the base z,
warn about attribute values it was not trained for, generate; return the report.

All option checks come before any file is fetched, read or written; the attribute warnings (stderr, through
:mod:`ohlora.logs`) before the first image is rendered.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ohlora.amp import amp_setting
from ohlora.cli import check_float
from ohlora.constants import PROPERTY_NAMES
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import MAX_IMAGES, Layout
from ohlora.records import array_digest, weights_digest
from ohlora.sharding import check_shard_option, merge_command, start
from stylegan_modified.generator_registry import GENERATORS, load_generator
from stylegan_modified.generation import (GenerationResult, GenerationSettings, check_outputs, generate_images,
                                          merge_shards, read_z_csv)
from stylegan_modified.labels import UPSTREAM_LABEL, label_warnings, option_name, score_ranges

logger = logging.getLogger(__name__)

MODELS = tuple(GENERATORS)  # v1, v2, v3 and the attribute directions (stylegan_modified/generator_registry.py)
DEFAULT_NUM, DEFAULT_SWEEP_NUM = 20, 4
DEFAULT_SWEEP_VALUES = '-2,-1,0,1,2'


@dataclass(frozen=True)
class Stage6Request:
    """The options of ``run_fine_tuned_generator.py``; ``attributes`` are the attribute z-scores (missing: upstream's
    final-test label), ``values`` the text of ``--values`` (the sweep's values)."""
    root: str | Path | None = None
    model: str = 'v3'
    weights: str | Path | None = None       # the generator; for 'directions' the base generator
    directions: str | Path | None = None    # --model directions: the directions file (default: Layout's)
    attributes: dict[str, float] = field(default_factory=lambda: dict(UPSTREAM_LABEL))
    num: int | None = None                  # None: 20, or 4 for a sweep
    variation: float = 0.3
    z_csv: str | Path | None = None         # default: Layout.test_z_csv
    outdir: str | Path | None = None
    sweep: str | None = None
    values: str | None = None               # None: DEFAULT_SWEEP_VALUES
    batch_size: int = 4
    seed: int = 0
    device: str | None = None
    progress: bool = True
    shard: str | None = None                # 'i/n': this job's share of a split run (then merge the shards)
    amp: bool = False                       # bfloat16 autocast (recorded in the settings)


@dataclass
class Stage6Report:
    result: GenerationResult
    shard: str | None = None     # a --shard job: its share ('i/n'); the merge is still to come
    merge_command: str = ''
    processes: int = 1           # torchrun: the ranks that rendered (the report is rank 0's)
    quiet: bool = False          # a torchrun rank other than 0 prints nothing

    def lines(self) -> list[str]:
        result = self.result
        if self.quiet:
            return []
        if self.shard is not None:
            return [f'shard {self.shard}: wrote {result.written} images into {result.folder}; once every shard has '
                    f'finished, merge them: {self.merge_command}']
        ranks = f' ({self.processes} processes)' if self.processes > 1 else ''
        return [f'wrote {result.written} images ({result.skipped} already there) into {result.folder}{ranks}'
                + (f'; grid: {result.grid}' if result.grid else '')]


def stage6_merge_command(root, model: str, outdir, sweep: str | None) -> str:
    """How the user merges the shards of this stage-6 folder (for the messages)."""
    options = ['--model', model] + (['--outdir', str(outdir)] if outdir else []) + (['--sweep', sweep] if sweep else [])
    return merge_command('6', Layout(root).root, *options)


def merge_stage6_shards(root, model: str = 'v3', outdir=None, sweep: str | None = None) -> list[str]:
    """``merge_shards.py --stage 6``: the settings record, z record and grid of a split run's folder."""
    if model not in MODELS:
        raise PipelineError(f'--model {model!r}: choose one of {", ".join(MODELS)}')
    if sweep is not None and sweep not in PROPERTY_NAMES:
        raise PipelineError(f'--sweep {sweep!r}: choose one of {", ".join(PROPERTY_NAMES)}')
    files = Layout(root).generation_folder(model, outdir, sweep)
    result = merge_shards(files, stage6_merge_command(root, model, outdir, sweep))
    return [f'merged the shards: {result.skipped} images in {result.folder}'
            + (f'; grid: {result.grid}' if result.grid else '')]


def parse_sweep_values(sweep: str | None, text: str | None) -> list[float] | None:
    """The values of ``--values`` for ``--sweep`` (None without a sweep); each finite, none twice."""
    if sweep is None:
        if text is not None:
            raise PipelineError('--values needs --sweep ATTR')
        return None
    text = DEFAULT_SWEEP_VALUES if text is None else text
    try:
        values = [float(part) + 0.0 for part in text.split(',') if part.strip()]  # + 0.0: -0.0 becomes 0.0
    except ValueError:
        raise PipelineError(f'--values {text!r} is not a comma-separated list of numbers') from None
    if not values:
        raise PipelineError('--values lists no value')
    for value in values:
        check_float('--values:', value)
    if len(set(values)) != len(values):
        raise PipelineError(f'--values {text!r} lists a value twice')
    return values


def warn_about_values(layout: Layout, request: Stage6Request, trained: tuple[str, ...], values: dict[str, float],
                      columns: list[float] | None) -> None:
    """A warning per attribute value the model never learned or that lies outside its training range."""
    ranges, source, notes = score_ranges(layout, request.model)
    lines = notes + label_warnings({k: v for k, v in values.items() if k != request.sweep}, request.model, trained,
                                   ranges, source)
    for value in columns or ():
        lines += label_warnings({request.sweep: value}, request.model, trained, ranges, source, via='--values')
    for line in lines:
        logger.warning('%s', line)


def run_stage6(request: Stage6Request) -> Stage6Report:
    """Render images 0..num-1 (each sweep value, for a sweep) that the output folder does not hold yet."""
    values = {name: request.attributes.get(name, UPSTREAM_LABEL[name]) for name in PROPERTY_NAMES}
    for name, value in values.items():  # all option checks come before any file is fetched, read or written
        check_float(option_name(name), value)
    if request.sweep is not None and request.sweep not in PROPERTY_NAMES:
        raise PipelineError(f'--sweep {request.sweep!r}: choose one of {", ".join(PROPERTY_NAMES)}')
    columns = parse_sweep_values(request.sweep, request.values)
    check_float('--variation', request.variation, 0.0)
    num = request.num or (DEFAULT_SWEEP_NUM if request.sweep else DEFAULT_NUM)
    if num > MAX_IMAGES:
        raise PipelineError(f'--num must be at most {MAX_IMAGES} (image names have six digits), got {num}')

    check_shard_option(request.shard)

    layout = Layout(request.root)
    files = layout.generation_folder(request.model, request.outdir, request.sweep)
    check_outputs(files)
    sharding = start(resolve_device(request.device), request.shard)
    device = sharding.ctx.device
    disable_tf32()
    loaded = load_generator(request.model, layout, request.weights, device, request.directions)
    generator, weights, directions = loaded.generator, loaded.weights, loaded.directions
    z_csv = request.z_csv if request.z_csv is not None else layout.test_z_csv
    base_z = read_z_csv(z_csv, generator.z_dim)
    warn_about_values(layout, request, generator.trained_attributes, values, columns)

    label = {k: (None if k == request.sweep else v) for k, v in values.items()}
    settings = GenerationSettings(model=request.model, weights_sha256=weights_digest(weights),
                                  z_sha256=array_digest(base_z), seed=request.seed, variation=request.variation,
                                  label=label, sweep=request.sweep,
                                  directions_sha256=None if directions is None else weights_digest(directions),
                                  amp=amp_setting(request.amp))
    names = {'weights_file': weights.name, 'z_file': Path(z_csv).name,
             **({'directions_file': directions.name} if directions is not None else {})}
    command = stage6_merge_command(request.root, request.model, request.outdir, request.sweep)
    result = generate_images(generator, files, settings, base_z, values, num, request.batch_size, columns,
                             progress=request.progress, names=names, shard=sharding.shard, merge_command=command)
    if sharding.torchrun:
        written = sharding.total(result.written)
        merged = sharding.finish(lambda: merge_shards(files, command))
        result.written, result.skipped = written, len(columns or [None]) * num - written
        result.grid = merged.grid if merged is not None else None
        return Stage6Report(result, processes=sharding.ctx.world_size, quiet=not sharding.ctx.is_main)
    return Stage6Report(result, shard=str(sharding.shard) if sharding.active else None, merge_command=command)
