"""The attribute directions as a :class:`~stylegan_modified.controllable.ControllableGenerator`.

``DirectionsControl(generator, directions, layers=None)``: for each z, w = mapping(z) (with the sampling
label for a conditional base), w is moved by the smallest step that makes the *predicted* score of every
controlled attribute equal the requested value (held attributes unchanged with ``--orthogonal``; see
:mod:`stylegan_modified.directions_file`), and the image is synthesised from the unedited w on every layer
except ``layers``, which get the edited w (stored noise, no truncation). Values of attributes the
directions do not control are ignored, as v3 ignores its four untrained label entries.

``load_directions_control(directions_path, base_weights_path, device, layout)`` is what stage 6 and the
evaluation call: it reads the directions file, finds the base generator (``base_weights_path``, else the
root's copy of the published file, downloaded if missing), refuses a generator whose SHA-256 is not the
one the directions were fitted on, and loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ohlora.constants import PROPERTY_NAMES
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.records import weights_digest
from ohlora.weights import fetch
from stylegan_modified.directions_file import AttributeDirections, read_directions, write_directions
from stylegan_modified.w_space import WGenerator, as_w_generator, broadcast_w, parse_layers

__all__ = ['DirectionsControl', 'load_directions_control', 'load_base_generator', 'BASE_GENERATORS',
           'read_directions', 'write_directions', 'AttributeDirections']

# --generator kind -> the ohlora.weights.SOURCES key of its published file
BASE_GENERATORS = {'original': 'genforce_stylegan256', 'v1': 'v1_generator'}


class DirectionsControl:
    """Absolute-target attribute control by moving w along fitted directions (ControllableGenerator)."""

    name = 'directions'
    score_algorithm = 2  # the property CNN's (stage-4 algorithm 2) z-score space

    def __init__(self, generator, directions: AttributeDirections, layers=None, base_weights: Path | None = None):
        self.base_weights = base_weights  # the base generator's file, when loaded from one
        label = directions.generator.get('label')
        self.w_generator: WGenerator = as_w_generator(generator, label)
        self.directions = directions
        if self.w_generator.w_dim != directions.w_dim:
            raise PipelineError(f'the directions are {directions.w_dim} wide, but the generator\'s w is '
                                f'{self.w_generator.w_dim} wide; they were fitted on another generator')
        recorded_z = directions.generator.get('z_dim')
        if recorded_z is not None and recorded_z != self.w_generator.z_dim:
            raise PipelineError(f'the directions were fitted on a generator with z width {recorded_z}, this one '
                                f'takes {self.w_generator.z_dim}')
        self.z_dim = self.w_generator.z_dim
        self.trained_attributes = tuple(directions.attributes)
        self.layers = parse_layers(directions.layers if layers is None else layers, self.w_generator.num_layers)
        self._columns = [PROPERTY_NAMES.index(a) for a in directions.attributes]

    @property
    def device(self) -> torch.device:
        return self.w_generator.device

    def targets(self, values: torch.Tensor) -> torch.Tensor:
        """The controlled attributes' columns [N, A] of requested values [N, 7] (standard order)."""
        if values.ndim != 2 or values.shape[1] != len(PROPERTY_NAMES):
            raise ValueError(f'values must have shape [N, {len(PROPERTY_NAMES)}], got {list(values.shape)}')
        return values[:, self._columns]

    @torch.inference_mode()
    def edited_w(self, z: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, edited w), both [N, w_dim], for z [N, z_dim] and requested values [N, 7]."""
        if z.ndim != 2 or z.shape[1] != self.z_dim or values.shape[0] != z.shape[0]:
            raise ValueError(f'z must have shape [N, {self.z_dim}] and values [N, {len(PROPERTY_NAMES)}] with the same N, got '
                             f'{list(z.shape)} and {list(values.shape)}')
        w = self.w_generator.w(z)
        return w, self.directions.edit(w, self.targets(values).to(w.device))

    @torch.inference_mode()
    def predicted_scores(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted score [N] of every fitted attribute for w [N, w_dim]."""
        predicted = self.directions.predict(w)
        return {name: predicted[:, i] for i, name in enumerate(self.directions.fitted_attributes)}

    @torch.inference_mode()
    def images(self, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        w, edited = self.edited_w(z, values)
        wp = broadcast_w(w, self.w_generator.num_layers)
        first, last = self.layers
        wp[:, first:last + 1] = edited.unsqueeze(1)
        return self.w_generator.images(wp)


def load_base_generator(kind: str, path: str | Path, device='cpu'):
    """The base generator of ``kind`` ('original': a GenForce zoo file; 'v1': an Oh-LoRA v1 state_dict), eval mode."""
    if kind == 'original':
        from stylegan.checkpoint import load_generator

        return load_generator(path, device=device)
    if kind == 'v1':
        from stylegan_modified.checkpoint import load_conditional_generator

        return load_conditional_generator(path, 'v1', device)
    raise PipelineError(f'unknown base generator {kind!r}; choose one of {", ".join(BASE_GENERATORS)}')


def load_directions_control(directions_path: str | Path, base_weights_path: str | Path | None = None,
                            device='cpu', layout: Layout | None = None, layers=None) -> DirectionsControl:
    """A :class:`DirectionsControl` from a directions file and the base generator it was fitted on.

    ``base_weights_path`` None: the root's copy of the published base generator (``ohlora.weights.fetch``,
    downloaded when missing). Its SHA-256 must be the one recorded in the directions file. ``layers``
    overrides the file's layer range ('all', 'A-B' or a (first, last) pair).
    """
    directions = read_directions(directions_path)
    record = directions.generator
    kind = record.get('kind')
    if kind not in BASE_GENERATORS:
        raise PipelineError(f'{directions_path} names an unknown base generator {kind!r}')
    path = fetch(BASE_GENERATORS[kind], layout or Layout(), base_weights_path)
    if weights_digest(path) != record['sha256']:
        raise PipelineError(f'{path} is not the base generator {directions_path} was fitted on (SHA-256 differs from '
                            f'that of {record["file"]}, {record.get("bytes")} bytes); pass that file with --weights')
    return DirectionsControl(load_base_generator(kind, path, device), directions, layers, base_weights=Path(path))
