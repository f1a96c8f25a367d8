"""The inputs of stage 5 v3 and how the models start (PIPELINE.md §7.4).

* labels: ``all_scores_v2_cnn.csv`` (the property CNN's predictions, written by stage 5 v2; 7 values, not
  re-normalised), or ``--scores`` (e.g. the upstream's published CSV for a faithful rerun). The labels and the
  loss / per-epoch test must come from the same property CNN: when v2's scoring record describes the CSV and
  names another CNN than ``--property-cnn`` (or the root's / downloaded one), the run is refused
  (:func:`check_labels_cnn`);
* ``--v1-weights``: the v1 generator (stage 5 v1, or the published ``stylegan_gen_fine_tuned_v1.pth``);
* ``--property-cnn``: the v2 property-score CNN (stage 5 v2, or the published ``…_v2_cnn.pth``);
* ``--gender-cnn``: the stage-2 gender CNN of fold 0 (``cnn/models/gender_model_0.pt``).

Each weights file has its default path and download source (:mod:`ohlora.weights`); a missing one is one line
that names the stage that makes it and the option that replaces it.

**Init** (as upstream): the v3 generator (label embedding 24 instead of 16) takes every v1 tensor except
``mapping.dense0.weight`` (its fan-in grows from z + 16 to z + 24) and ``mapping.label_weight`` (7 x 24), which
start random, drawn with the CVAE encoder's initial weights from a generator seeded by ``--seed`` (upstream:
unseeded). The encoder's z width follows the generator's (:meth:`CVAEEncoder.for_generator`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cnn.ensemble import load_model
from ohlora.checkpoints import load_strict, read_checkpoint, state_dict_mismatch
from ohlora.devices import item_generator
from ohlora.errors import PipelineError, WeightsUnavailable
from ohlora.layout import Layout, cnn_model_name
from ohlora.weights import SOURCES, cnn_key, fetch
from stylegan_modified.property_cnn_scoring import describe_cnn, scores_record
from stylegan_modified.checkpoint import (describe_checkpoint, infer_conditional_generator_kwargs,
                                          infer_cvae_encoder_kwargs, load_conditional_generator)
from stylegan_modified.cvae_encoder import IMAGE_SIZE, CVAEEncoder
from stylegan_modified.stylegan_generator import StyleGANGeneratorForV3

LABEL_CONVERT_DIM = StyleGANGeneratorForV3.LABEL_CONVERT_DIM  # 24
FRESH_KEYS = ('mapping.dense0.weight', 'mapping.label_weight')  # not taken from v1 (their shapes change)
INIT_STREAM = 52  # item_generator stream of the random init (dense0.weight, label_weight, the encoder)
GENDER_CNN_EXPECTED = f'Oh-LoRA gender CNN of fold 0 ({cnn_model_name("gender", 0)})'

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    source: str      # ohlora.weights.SOURCES key
    option: str
    made_by: str     # which stage writes it


INPUTS = {
    'v1_weights': InputSpec('v1_generator', '--v1-weights', 'stage 5 v1 (run_stylegan_fine_tuning.py) makes it'),
    'property_cnn': InputSpec('v2_property_cnn', '--property-cnn',
                              'stage 5 v2 (run_stylegan_fine_tuning_v2.py) makes it'),
    'gender_cnn': InputSpec(cnn_key('gender', 0), '--gender-cnn', 'stage 2 (run_cnn.py) makes it'),
}
SCORES_MADE_BY = 'run run_stylegan_fine_tuning_v2.py first (stage 5 v2 writes it)'


def fetch_input(name: str, layout: Layout, override: str | Path | None) -> Path:
    """The file of input ``name`` (:data:`INPUTS`): the option's path, the root's copy, or a download."""
    spec = INPUTS[name]
    description = SOURCES[spec.source].description
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise PipelineError(f'{spec.option} {path}: no such file (expected the {description})')
        return path
    try:
        return fetch(spec.source, layout)
    except WeightsUnavailable as exc:
        message = str(exc).replace('or pass --weights PATH', f'or pass {spec.option} PATH')
        raise PipelineError(f'{message}; {spec.made_by}') from None


def scores_csv_path(layout: Layout, override: str | Path | None) -> Path:
    """``--scores`` or the root's ``all_scores_v2_cnn.csv``; a missing default names the stage that writes it."""
    if override is not None:
        return Path(override)
    path = layout.property_cnn_scores_csv
    if not path.is_file():
        raise PipelineError(f'{path} does not exist: {SCORES_MADE_BY}, or pass --scores CSV (e.g. the upstream\'s '
                            f'published {path.name})')
    return path


def check_labels_cnn(layout: Layout, scores_csv: Path, explicit: bool, property_cnn: Path,
                     property_sha256: str) -> None:
    """Refuse labels scored by another property CNN than the one the loss and the test use.

    v2's ``scoring_record.json`` names the CNN (SHA-256, file, run) that wrote the root's ``all_scores_v2_cnn.csv``.
    If it describes ``scores_csv`` and names another CNN than ``property_cnn``: the default CSV is refused in one
    line; an explicit ``--scores`` is the user's choice (a warning). A CSV the record does not describe (upstream's
    published one, a CSV from elsewhere) cannot be checked: a note."""
    recorded = scores_record(layout, scores_csv)
    if recorded is None:
        logger.info('%s has no scoring record of stage 5 v2 (e.g. upstream\'s published CSV): which property CNN '
                    'made its labels is not checked against %s', scores_csv, property_cnn)
        return
    theirs = recorded['inputs'].get('property_cnn_sha256')
    if theirs == property_sha256:
        return
    scored_by = describe_cnn(recorded.get('property_cnn'), theirs)
    uses = f'{property_cnn}, SHA-256 {property_sha256[:16]}…'
    if explicit:
        logger.warning('--scores %s was scored by another property CNN (%s) than the one this run trains and tests '
                       'with (%s); training on these labels as asked', scores_csv, scored_by, uses)
        return
    raise PipelineError(f'{scores_csv} was scored by another property CNN ({scored_by}) than the one this run trains '
                        f'and tests with ({uses}): pass --property-cnn with the CNN that scored it, or --scores CSV '
                        'to choose the labels yourself')


def load_gender_cnn(path: str | Path, device='cpu') -> torch.nn.Module:
    """The stage-2 gender CNN (fold 0) of a state_dict file, in eval mode; another model's file is one line."""
    description, found = describe_checkpoint(read_checkpoint(path, GENDER_CNN_EXPECTED))
    if found != 'gender cnn':
        raise PipelineError(f'{path} is {description}, not the {GENDER_CNN_EXPECTED}')
    return load_model('gender', path, device, fold=0)


def _check_finite(state_dict: dict, path: Path, what: str) -> None:
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise PipelineError(f'{path} holds NaN or infinite values ({", ".join(broken[:3])}); expected the {what}')


def build_v3_models(v1_path: str | Path, seed: int = 0) -> tuple[StyleGANGeneratorForV3, CVAEEncoder]:
    """The v3 generator initialised from the v1 file (module docstring) and a fresh encoder, CPU, train mode."""
    path = Path(v1_path)
    with torch.random.fork_rng(devices=[]):  # building the v1 module draws its (discarded) init weights
        v1 = load_conditional_generator(path, 'v1')  # one line for a v3/v4 generator, a CNN, a zoo file, ...
    if v1.resolution != IMAGE_SIZE:
        raise PipelineError(f'{path}: the generator makes {v1.resolution}x{v1.resolution} images; v3 needs '
                            f'{IMAGE_SIZE}x{IMAGE_SIZE} ones (the encoder and both CNNs read 256x256 images)')
    source = {k: v.detach().clone() for k, v in v1.state_dict().items()}
    _check_finite(source, path, 'Oh-LoRA v1 generator')
    kwargs = infer_conditional_generator_kwargs(source)
    kwargs['label_convert_dim'] = LABEL_CONVERT_DIM
    # The random tensors come from a forked RNG seeded from --seed: the global streams are seeded for training.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_generator(seed, 0, INIT_STREAM).initial_seed())
        generator = StyleGANGeneratorForV3(**kwargs)
        encoder = CVAEEncoder.for_generator(generator)
    kept = {k: v for k, v in source.items() if k not in FRESH_KEYS}
    problem = state_dict_mismatch(generator, {**{k: v for k, v in generator.state_dict().items()
                                                 if k in FRESH_KEYS}, **kept})
    if problem:  # cannot happen for a file that loaded as v1, but a silent partial load would be worse
        raise PipelineError(f'{path}: the v1 generator does not fit the v3 generator: {problem}')
    missing, unexpected = generator.load_state_dict(kept, strict=False)
    assert set(missing) == set(FRESH_KEYS) and not unexpected, (missing, unexpected)
    return generator.train(), encoder.train()


def v3_models_from_state(g_state: dict, e_state: dict, where: Path) -> tuple[StyleGANGeneratorForV3, CVAEEncoder]:
    """The generator and encoder of a resume record."""
    try:
        generator = StyleGANGeneratorForV3(**infer_conditional_generator_kwargs(g_state))
        encoder = CVAEEncoder(**infer_cvae_encoder_kwargs(e_state))
    except ValueError as exc:
        raise PipelineError(f'{where}: its weights are not a v3 generator and encoder: {exc}') from None
    load_strict(generator, g_state, where, 'v3 generator')
    load_strict(encoder, e_state, where, 'CVAE encoder')
    return generator.train(), encoder.train()
