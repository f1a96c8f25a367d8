"""Which generators the attribute-control evaluation can load: ``--model NAME`` -> a factory.

Every entry of :data:`GENERATORS` turns (layout, ``--weights`` or None, device) into a
:class:`~stylegan_modified.controllable.ControllableGenerator` plus the files that decide its images (their
SHA-256 keys the run folder). The evaluation sees nothing else, so a new way of controlling attributes plugs
in with one entry, e.g. the attribute directions::

    GENERATORS['directions'] = GeneratorEntry(load_directions, 'attribute directions in w; --weights: the '
                                              'directions file')

where ``load_directions(layout, weights, device) -> LoadedGenerator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.weights import fetch
from stylegan_modified.checkpoint import WrongCheckpoint, load_conditional_generator
from stylegan_modified.controllable import ConditionalControl, ControllableGenerator


@dataclass(frozen=True)
class LoadedGenerator:
    generator: ControllableGenerator
    files: tuple[Path, ...]  # every file that decides the images (hashed into the run's settings record)


Factory = Callable[[Layout, 'str | Path | None', torch.device], LoadedGenerator]


@dataclass(frozen=True)
class GeneratorEntry:
    load: Factory
    help: str  # one line for --help: what the model is and what --weights means for it


# The published weights of each conditional variant (ohlora.weights.SOURCES keys); v2 was never published.
CONDITIONAL_SOURCES = {'v1': 'v1_generator', 'v2': None, 'v3': 'v3_generator'}


def _conditional(variant: str) -> Factory:
    def load(layout: Layout, weights: str | Path | None, device: torch.device) -> LoadedGenerator:
        source = CONDITIONAL_SOURCES[variant]
        if source is None and weights is None:
            raise PipelineError(f'--model {variant} needs --weights PATH: no {variant} generator was published '
                                '(upstream found v2 not trainable); pass the file your stage-5 run wrote')
        path = fetch(source, layout, weights) if source is not None else Path(weights)
        try:
            generator = load_conditional_generator(path, variant, device)
        except WrongCheckpoint as exc:
            loads_as = {'generator v1': 'v1 (or v2)', 'generator v3': 'v3'}.get(exc.found)
            hint = f'; it loads with --model {loads_as}' if loads_as else ''
            raise PipelineError(f'{exc}{hint}') from None
        return LoadedGenerator(ConditionalControl(generator, variant), (path,))
    return load


GENERATORS: dict[str, GeneratorEntry] = {
    'v1': GeneratorEntry(_conditional('v1'), 'conditional v1 (all seven attributes, algorithm-1 labels)'),
    'v2': GeneratorEntry(_conditional('v2'), 'conditional v2 (--weights required: never published)'),
    'v3': GeneratorEntry(_conditional('v3'), 'conditional v3, the one upstream adopted (eyes, mouth, pose)'),
}


def load_generator(name: str, layout: Layout, weights: str | Path | None, device: torch.device) -> LoadedGenerator:
    entry = GENERATORS.get(name)
    if entry is None:
        raise PipelineError(f'unknown --model {name!r}; choose one of {", ".join(GENERATORS)}')
    return entry.load(layout, weights, device)
