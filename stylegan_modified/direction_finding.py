"""The directions tool from end to end: check the options, load the base generator and the property CNN,
sample (resumably), fit, and write the directions file and its fit-quality report.

Every option is checked before any file is fetched, read or written; the layer range once the generator's
depth is known, still before anything is written. The sampling can be split: under torchrun every rank samples
its chunks and rank 0 merges and fits; ``--shard i/n`` jobs only sample, then ``merge_shards.py --stage
directions`` and a run without ``--shard`` (which reuses every sample) fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ohlora import atomic
from ohlora.amp import AMP_NAME
from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.sharding import check_shard_option, merge_command, start
from ohlora.weights import fetch
from stylegan_modified.attribute_directions import BASE_GENERATORS, load_base_generator
from stylegan_modified.checkpoint import published_property_cnn
from stylegan_modified.direction_fitting import FitOptions, check_fit_options, fit_directions, minimum_samples
from stylegan_modified.direction_sampling import (PropertyCNNScorer, SampleSettings, chunk_plan, file_identity,
                                                  merge_shards, sample_w_and_scores)
from stylegan_modified.directions_file import AttributeDirections, write_directions
from stylegan_modified.w_space import StyleGANW, parse_layers

DEFAULT_NUM = 80_000
DEFAULT_CHUNK_SIZE = 1_000


@dataclass(frozen=True)
class FindRequest:
    fit: FitOptions = field(default_factory=FitOptions)
    generator: str = 'original'           # base generator kind: 'original' (GenForce) or 'v1'
    weights: str | None = None            # base generator file (default: the published one)
    property_cnn: str | None = None       # property CNN file (default: the published one)
    num: int = DEFAULT_NUM
    layers: str = 'all'
    save_images: bool = False
    output: str | None = None             # directions file (default: Layout.attribute_directions)
    samples_dir: str | None = None        # default: Layout.direction_samples_dir
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    root: str | None = None
    progress: bool = True
    shard: str | None = None              # 'i/n': sample this job's chunks only (then merge, then fit)
    amp: bool = False                     # generator and property CNN under bfloat16 autocast (recorded)


@dataclass
class ShardSamplingReport:
    """What a ``--shard`` job (or a torchrun rank other than 0) did: its chunks, no fit."""
    samples_folder: Path
    shard: str
    computed: int
    reused: int
    merge_command: str
    quiet: bool = False

    def lines(self) -> list[str]:
        if self.quiet:
            return []
        return [f'shard {self.shard}: sampled {self.computed} images ({self.reused} reused) into {self.samples_folder}; '
                f'once every shard has finished, merge them ({self.merge_command}), then fit: rerun without --shard '
                '(every sample is reused)']


def directions_merge_command(root, samples_dir) -> str:
    return merge_command('directions', Layout(root).root,
                                 *(['--samples-dir', str(samples_dir)] if samples_dir else []))


def merge_direction_shards(root, samples_dir=None) -> list[str]:
    """``merge_shards.py --stage directions``: the samples record of a split sampling."""
    files = Layout(root).direction_samples(samples_dir)
    num, shards = merge_shards(files, directions_merge_command(root, samples_dir))
    return [f'merged {shards} shards: {num} samples in {files.folder}; now fit with find_attribute_directions.py '
            '(the same options, without --shard: every sample is reused)']


@dataclass
class FindResult:
    directions: AttributeDirections
    output: Path
    report: Path
    samples_folder: Path
    computed: int
    reused: int

    def lines(self) -> list[str]:
        """What the script prints: the fit quality per attribute, then where everything went."""
        d = self.directions
        head = (f'{d.method} directions for {", ".join(d.attributes)}'
                + (f' (holding {", ".join(d.held_attributes)})' if d.held_attributes else '')
                + f' from {d.num} samples ({self.computed} sampled now, {self.reused} reused from '
                  f'{self.samples_folder})')
        return [head, *('  ' + line for line in _quality_lines(d)), f'wrote {self.output} and {self.report}']


def check_request(request: FindRequest) -> None:
    if request.generator not in BASE_GENERATORS:
        raise PipelineError(f'--generator {request.generator!r}: choose one of {", ".join(BASE_GENERATORS)}')
    check_fit_options(request.fit)
    if request.num < minimum_samples(request.fit):
        raise PipelineError(f'--num {request.num} is too few samples for this fit; use at least '
                            f'{minimum_samples(request.fit)} (default: {DEFAULT_NUM})')
    if request.chunk_size < 1 or request.batch_size < 1:
        raise PipelineError('--chunk-size and --batch-size must be at least 1')
    parse_layers(request.layers, 10 ** 6)  # the syntax now; the range once the generator is loaded
    check_shard_option(request.shard)
    if request.output is not None and Path(request.output).is_dir():
        raise PipelineError(f'--output {request.output} is a folder; give the directions file\'s path')


def check_outputs(request: FindRequest, output: Path, files) -> None:
    """Every output path can be written (checked before any file is fetched or sampled): a refusal after sampling
    would leave hours of samples and no directions."""
    atomic.check_writable(output.parent, files.folder, *([files.images_dir] if request.save_images else []))
    images = (files.image(n) for n in range(request.num)) if request.save_images else ()
    atomic.check_replaceable(output, Layout.directions_report(output), files.settings_json,
                             *(files.chunk(k) for k, _, _ in chunk_plan(request.num, request.chunk_size)), *images)


def _f(value) -> str:
    return 'n/a' if value is None else f'{value:.3f}'  # None: too few held-out samples for the figure


def _quality_lines(directions: AttributeDirections) -> list[str]:
    lines = []
    for name in directions.fitted_attributes:
        q = directions.fit_quality[name]
        held = ' (held)' if name in directions.held_attributes else ''
        if directions.method == 'svm':
            lines.append(f'{name}{held}: held-out accuracy {_f(q["accuracy"])}, calibrated r {_f(q["r"])}, '
                         f'R² {_f(q["r2"])}, cosine to the score gradient {_f(q.get("cos_gradient"))}')
        else:
            lines.append(f'{name}{held}: held-out R² {_f(q["r2"])}, r {_f(q["r"])}')
    if 'group_agreement' in directions.fit_quality:
        lines.append(f'group chosen from w = group of the scores: {directions.fit_quality["group_agreement"]:.3f}')
    return lines


def find_attribute_directions(request: FindRequest) -> FindResult | ShardSamplingReport:
    """Sample, fit, write; returns what was written and the fit quality (:meth:`FindResult.lines`). A ``--shard``
    job only samples its chunks (:class:`ShardSamplingReport`); under torchrun rank 0 merges and fits."""
    check_request(request)
    layout = Layout(request.root)
    output = Path(request.output) if request.output is not None else layout.attribute_directions
    files = layout.direction_samples(request.samples_dir)
    check_outputs(request, output, files)

    sharding = start(resolve_device(request.device), request.shard)
    device = sharding.ctx.device
    disable_tf32()
    weights = fetch(BASE_GENERATORS[request.generator], layout, request.weights)
    generator = load_base_generator(request.generator, weights, device)
    w_generator = StyleGANW(generator)
    layers = parse_layers(request.layers, w_generator.num_layers)
    cnn_path = fetch('v2_property_cnn', layout, request.property_cnn)
    scorer = PropertyCNNScorer(published_property_cnn(layout, device, cnn_path))

    label = None if w_generator.label is None else [float(v) for v in w_generator.label]
    generator_record = {'kind': request.generator, **file_identity(weights), 'label': label,
                        'generator_key': 'generator' if request.generator == 'original' else None,
                        'z_dim': w_generator.z_dim, 'w_dim': w_generator.w_dim, 'num_layers': w_generator.num_layers}
    cnn_record = file_identity(cnn_path)
    settings = SampleSettings(generator=generator_record, scorer=cnn_record, seed=request.seed,
                              z_dim=w_generator.z_dim, w_dim=w_generator.w_dim, num_layers=w_generator.num_layers,
                              chunk_size=request.chunk_size, extra={'amp': AMP_NAME} if request.amp else {})
    command = directions_merge_command(request.root, request.samples_dir)
    if sharding.active:
        share = sample_w_and_scores(w_generator, scorer, files, settings, request.num, request.batch_size,
                                    request.save_images, request.progress, shard=sharding.shard, merge_command=command)
        report = ShardSamplingReport(files.folder, str(sharding.shard), share.computed, share.reused, command)
        if not sharding.torchrun:
            return report
        computed = sharding.total(share.computed)
        sharding.finish(lambda: merge_shards(files, command))
        if not sharding.ctx.is_main:
            report.quiet = True
            return report
    samples = sample_w_and_scores(w_generator, scorer, files, settings, request.num, request.batch_size,
                                  request.save_images, request.progress)
    if sharding.torchrun:
        samples.computed, samples.reused = computed, request.num - computed
    directions = fit_directions(samples.w, samples.scores, replace(request.fit, seed=request.seed),
                                generator=generator_record, property_cnn=cnn_record, num=samples.num,
                                seed=request.seed, layers=layers)
    write_directions(output, directions)
    report = Layout.directions_report(output)
    atomic.write_json(report, {'method': directions.method, 'attributes': list(directions.attributes),
                               'held_attributes': list(directions.held_attributes), 'num': directions.num,
                               'seed': directions.seed, 'options': directions.options,
                               'fit_quality': directions.fit_quality})
    return FindResult(directions, output, report, files.folder, samples.computed, samples.reused)
