"""From command-line options to a finished evaluation: check them, load the generator, the z, the measurer, the
optional judges, then run :func:`stylegan_modified.evaluation_run.evaluate`.

Every option check and every file the run needs is settled before the run folder is touched, so a bad input
ends in one ``PipelineError`` line with nothing written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ohlora.devices import disable_tf32, resolve_device
from ohlora.errors import PipelineError, WeightsUnavailable
from ohlora.layout import Layout
from stylegan_modified.attribute_measurers import MEASURES, fetch_as, parsing_measurer, property_cnn_measurer
from stylegan_modified.generator_registry import GENERATORS, load_generator
from stylegan_modified.evaluation_inputs import grid_warnings, parse_grid, read_z_rows, seeded_z
from stylegan_modified.evaluation_run import EvaluationInputs, EvaluationResult, evaluate
from stylegan_modified.face_identity import load_face_embedder
from stylegan_modified.gender_quality_judge import load_judge

logger = logging.getLogger(__name__)

DEFAULT_NUM = 100
IDENTITY_SOURCE = 'facenet_vggface2'


@dataclass
class EvaluationOptions:
    """The script's options (``vars(args)``); None means the documented default."""
    model: str = 'v3'
    weights: str | None = None
    directions: str | None = None
    num: int | None = None
    z_csv: str | None = None
    grid: list[str] | None = None
    measure: str | None = None
    algorithm: int | None = None
    stats: str | None = None
    property_cnn: str | None = None
    facexformer: str | None = None
    identity_weights: str | None = None
    no_identity: bool = False
    cnn_weights: str | None = None
    no_shares: bool = False
    outdir: str | None = None
    root: str | None = None
    device: str | None = None
    batch_size: int = 8
    seed: int = 0
    no_progress: bool = False


def check_options(options: EvaluationOptions) -> None:
    """The checks that need no file: ranges, combinations, names."""
    if options.model not in GENERATORS:
        raise PipelineError(f'unknown --model {options.model!r}; choose one of {", ".join(GENERATORS)}')
    if options.num is not None and options.num < 1:
        raise PipelineError(f'--num must be at least 1, got {options.num}')
    if options.num is not None and options.z_csv is not None:
        raise PipelineError('--num and --z-csv exclude each other: --z-csv evaluates every row of the CSV')
    if options.measure is not None and options.measure not in MEASURES:
        raise PipelineError(f'unknown --measure {options.measure!r}; choose one of {", ".join(MEASURES)}')
    if options.algorithm is not None and options.algorithm not in (1, 2):
        raise PipelineError(f'--algorithm must be 1 or 2, got {options.algorithm}')
    if options.batch_size < 1:
        raise PipelineError(f'--batch-size must be at least 1, got {options.batch_size}')
    if options.no_identity and options.identity_weights is not None:
        raise PipelineError('--no-identity and --identity-weights exclude each other')
    if options.no_shares and options.cnn_weights is not None:
        raise PipelineError('--no-shares and --cnn-weights exclude each other')


def check_measure_options(options: EvaluationOptions, measure: str, model: str) -> None:
    """Options of the other measure are refused rather than ignored."""
    default = '' if options.measure else f' (the default measure of {model} is {measure})'
    if measure == 'property-cnn':
        given = [o for o, v in (('--algorithm', options.algorithm), ('--stats', options.stats),
                                ('--facexformer', options.facexformer)) if v is not None]
        if given:
            raise PipelineError(f'{", ".join(given)} only apply to --measure parsing{default}; the property CNN '
                                'predicts algorithm-2 z-scores itself')
    elif options.property_cnn is not None:
        raise PipelineError(f'--property-cnn only applies to --measure property-cnn{default}')


def instrument_warnings(generator, measurer) -> list[str]:
    """A line when the generator was fitted with another property CNN (by SHA-256) than the one measuring it: the
    directions hit the targets of the CNN they were fitted with, so another CNN's MAE mixes in the instruments'
    disagreement."""
    fitted = getattr(getattr(generator, 'directions', None), 'property_cnn', None)
    fitted_sha = fitted.get('sha256') if isinstance(fitted, dict) else None
    measuring_sha = measurer.settings().get('weights_sha256')
    if not fitted_sha or not measuring_sha or fitted_sha == measuring_sha:
        return []
    return [f'the {generator.name} were fitted with the property CNN {fitted.get("file", "?")} (SHA-256 '
            f'{fitted_sha[:12]}…), but another one measures them (SHA-256 {measuring_sha[:12]}…): r still shows '
            'control, MAE and the pass rules also measure how far the two CNNs disagree']


def _embedder(options: EvaluationOptions, layout: Layout, device) -> tuple[object | None, str]:
    if options.no_identity:
        return None, 'identity: switched off (--no-identity)'
    try:
        path = fetch_as(IDENTITY_SOURCE, layout, options.identity_weights, '--identity-weights')
    except WeightsUnavailable:
        return None, (f'identity: the face-embedding weights are not at {layout.identity_weights} and cannot be '
                      'downloaded here; pass --identity-weights PATH')
    return load_face_embedder(path, device), ''


def run_evaluation(options: EvaluationOptions, on_warning: Callable[[str], None] | None = None) -> EvaluationResult:
    """The whole evaluation of the script; warnings (untrained grid attributes, another score space) go to
    ``on_warning`` (default: this module's logger) before the long part starts."""
    warn = on_warning or logger.warning
    check_options(options)
    grid = parse_grid(options.grid)
    layout = Layout(options.root)
    device = resolve_device(options.device)
    disable_tf32()

    loaded = load_generator(options.model, layout, options.weights, device, options.directions)
    generator = loaded.generator
    if options.z_csv is not None:
        z, z_source = read_z_rows(options.z_csv, generator.z_dim), f'file {Path(options.z_csv).name}'
    else:
        num = options.num or DEFAULT_NUM
        z, z_source = seeded_z(options.seed, num, generator.z_dim), f'seed {options.seed}'

    measure = options.measure or ('property-cnn' if generator.score_algorithm == 2 else 'parsing')
    check_measure_options(options, measure, generator.name)
    if measure == 'property-cnn':
        measurer = property_cnn_measurer(layout, options.property_cnn, device)
    else:
        measurer = parsing_measurer(layout, options.algorithm or generator.score_algorithm, options.stats,
                                    options.facexformer, device)

    lines = grid_warnings(grid, generator.name, generator.trained_attributes)
    lines += instrument_warnings(generator, measurer)
    if measurer.algorithm != generator.score_algorithm:
        lines.append(f'{generator.name} was trained on algorithm-{generator.score_algorithm} scores but '
                     f'{measure} measures algorithm-{measurer.algorithm} scores: r still shows control, '
                     'MAE and the pass rules compare two different scales')
    left_out = []
    embedder, reason = _embedder(options, layout, device)
    if reason:
        left_out.append(reason)
    judge = None
    if options.no_shares:
        left_out.append('female and good-quality shares: switched off (--no-shares)')
    else:
        judge, reason = load_judge(layout, options.cnn_weights, device)
        if reason:
            left_out.append(f'female and good-quality shares: {reason}')
    for line in lines:
        warn(line)

    inputs = EvaluationInputs(generator, measurer, z, grid, loaded.files, z_source, embedder, judge, left_out)
    # Each score space gets its own default folder, so both parsing algorithms can be run side by side.
    label = measure if measure == 'property-cnn' else f'{measure}-alg{measurer.algorithm}'
    folder = layout.attribute_control_folder(generator.name, label, options.outdir)
    return evaluate(inputs, folder, options.batch_size, progress=not options.no_progress,
                    title=f'{generator.name}, {measure} (algorithm {measurer.algorithm})')
