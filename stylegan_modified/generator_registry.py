"""Which generators stage 6 and the evaluation can load: ``--model NAME`` -> a factory.

Every entry of :data:`GENERATORS` turns (layout, ``--weights`` or None, device, ``--directions`` or None) into a
:class:`~stylegan_modified.controllable.ControllableGenerator` plus the files that decide its images (their
SHA-256 keys the run records). Stage 6 and the evaluation see nothing else, so a new way of controlling
attributes plugs in with one entry here.

* ``v1``, ``v3``: the published conditional generators (downloaded when missing) or ``--weights``;
* ``v2``: not published (upstream found it untrainable): the file ``run_stylegan_fine_tuning_v2.py
  --train-generator`` writes under the root, or ``--weights``;
* ``directions``: a base generator (``--weights``, default the published one the file names) moved along the
  attribute directions of ``--directions`` (default: the root's ``find_attribute_directions.py`` output).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ohlora.errors import PipelineError
from ohlora.layout import V2_GENERATOR_FILE, Layout
from ohlora.weights import fetch
from stylegan_modified.attribute_directions import load_directions_control
from stylegan_modified.checkpoint import WrongCheckpoint, load_conditional_generator
from stylegan_modified.controllable import ConditionalControl, ControllableGenerator

__all__ = ['GENERATORS', 'GeneratorEntry', 'LoadedGenerator', 'load_generator']


@dataclass(frozen=True)
class LoadedGenerator:
    generator: ControllableGenerator
    files: tuple[Path, ...]          # every file that decides the images (hashed into a run's settings record)
    directions: Path | None = None   # 'directions': the directions file (one of ``files``)

    @property
    def weights(self) -> Path | None:
        """The generator's weights file (for 'directions': the base generator's)."""
        return next((f for f in self.files if f != self.directions), None)


Factory = Callable[[Layout, 'str | Path | None', torch.device, 'str | Path | None'], LoadedGenerator]


@dataclass(frozen=True)
class GeneratorEntry:
    load: Factory
    help: str  # one line for --help: what the model is and what --weights means for it


# The published weights of each conditional variant (ohlora.weights.SOURCES keys); v2 was never published.
CONDITIONAL_SOURCES = {'v1': 'v1_generator', 'v2': None, 'v3': 'v3_generator'}


def _conditional(variant: str) -> Factory:
    def load(layout: Layout, weights, device: torch.device, directions=None) -> LoadedGenerator:
        if directions is not None:
            raise PipelineError('--directions goes with --model directions')
        source = CONDITIONAL_SOURCES[variant]
        if source is not None:
            path = fetch(source, layout, weights)
        else:
            path = Path(weights) if weights is not None else layout.fine_tuned(V2_GENERATOR_FILE)
            if not path.is_file():
                raise PipelineError(f'{path}: no such file; train the {variant} generator with '
                                    'run_stylegan_fine_tuning_v2.py --train-generator (upstream never published it) '
                                    'or pass --weights')
        try:
            generator = load_conditional_generator(path, variant, device)
        except WrongCheckpoint as exc:
            loads_as = {'generator v1': 'v1 (or v2)', 'generator v3': 'v3'}.get(exc.found)
            hint = f'; it loads with --model {loads_as}' if loads_as else ''
            raise PipelineError(f'{exc}{hint}') from None
        return LoadedGenerator(ConditionalControl(generator, variant), (path,))
    return load


def _directions(layout: Layout, weights, device: torch.device, directions=None) -> LoadedGenerator:
    path = Path(directions) if directions is not None else layout.attribute_directions
    if not path.is_file():
        raise PipelineError(f'{path}: no such directions file; make it with find_attribute_directions.py or pass '
                            '--directions FILE')
    control = load_directions_control(path, weights, device, layout)
    return LoadedGenerator(control, (path, control.base_weights), directions=path)


GENERATORS: dict[str, GeneratorEntry] = {
    'v1': GeneratorEntry(_conditional('v1'), 'conditional v1 (all seven attributes, algorithm-1 labels)'),
    'v2': GeneratorEntry(_conditional('v2'), 'conditional v2 (never published: the file v2 training wrote)'),
    'v3': GeneratorEntry(_conditional('v3'), 'conditional v3, the one upstream adopted (eyes, mouth, pose)'),
    'directions': GeneratorEntry(_directions, 'a base generator moved along fitted attribute directions '
                                              '(--directions FILE; --weights: the base generator)'),
}


def load_generator(name: str, layout: Layout, weights: str | Path | None, device: torch.device,
                   directions: str | Path | None = None) -> LoadedGenerator:
    entry = GENERATORS.get(name)
    if entry is None:
        raise PipelineError(f'unknown --model {name!r}; choose one of {", ".join(GENERATORS)}')
    return entry.load(layout, weights, device, directions)
