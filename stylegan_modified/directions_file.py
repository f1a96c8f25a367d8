"""Fitted attribute directions in w: the linear score model, absolute-target edits, and the file they live in.

Every fitted attribute *a* has a linear **predicted score** s_a(w) = A_a · w + b_a (``weights``,
``intercepts``: the least-squares model of its score on w), in the z-score space of the property CNN
(stage-4 algorithm 2). Its unit ``normal`` n_a is the direction an edit moves along: A_a / |A_a| (ridge) or
the SVM's unit normal (svm). ``slope`` = A_a · n_a is the predicted-score change per unit step along it
(ridge: |A_a|, and A_a = slope_a · n_a).

**Edit (absolute targets).** For a w and requested values t_S of the controlled attributes S, the edit
moves w within the span of the fitted normals N (rows n_a) so that the predicted scores hit the targets,
A_S (w + Δw) + b_S = t_S: Δw = Nᵀ (A Nᵀ)⁺ r, r the residuals (t_S − A_S w − b_S, and 0 for held
attributes). For ridge N = D⁻¹A (D = diag|A_a|), so this is Aᵀ (A Aᵀ)⁺ r, the smallest move (Euclidean),
computed as the pseudo-inverse of A so that parallel directions do not blow up. For svm it steps along the
SVM normals, as upstream, by the amounts that the full model says reach the targets. (Files written before
the svm calibration used the full model held A_a = slope_a · n_a, for which both forms agree.) With
``held_attributes`` (``--orthogonal``) their rows join the constraints with the target "unchanged" (their
own predicted value), so the move is restricted to what leaves them alone: InterFaceGAN's conditional
manipulation, in closed form for any number of attributes.
``directions`` are the corresponding unit edit directions: each controlled normal projected off the span
of every other fitted normal (without ``--orthogonal``, the normals themselves).

**Groups** (svm ``--groups``, as upstream): the samples were split at the medians of hair_color,
hair_length and background_mean into 2³ groups with one model per group. At edit time the group of a w is
chosen from the *predicted* values of those three attributes (a least-squares model of each on w, stored
here) against the recorded medians, bit k of the group number being attribute k above its median
(hair_color is the most significant bit). Upstream scored the unedited image with the CNN instead; this
needs no CNN at generation time.

The file is a plain dict of tensors and plain types (``torch.load(weights_only=True)``), see
:meth:`AttributeDirections.to_dict`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ohlora import atomic
from ohlora.checkpoints import read_checkpoint
from ohlora.constants import LABEL_SIZE, PROPERTY_NAMES
from ohlora.errors import PipelineError

FILE_FORMAT = 'ohlora-attribute-directions'
FILE_VERSION = 1
WHAT = 'attribute-directions file (find_attribute_directions.py)'
METHODS = ('ridge', 'svm')
GROUP_ATTRIBUTES = ('hair_color', 'hair_length', 'background_mean')
TENSOR_KEYS = ('weights', 'intercepts', 'normals', 'slopes', 'directions', 'group_weights', 'group_intercepts',
               'group_medians')


@dataclass
class AttributeDirections:
    method: str                            # 'ridge' or 'svm'
    attributes: tuple[str, ...]            # controlled attributes (the rows of ``directions``)
    held_attributes: tuple[str, ...]       # held at their predicted values by every edit (--orthogonal)
    weights: torch.Tensor                  # [G, F, w_dim] float64: score gradient of each fitted attribute
    intercepts: torch.Tensor               # [G, F] float64
    normals: torch.Tensor                  # [G, F, w_dim] unit fitted directions (what an edit moves along)
    slopes: torch.Tensor                   # [G, F] predicted-score change per unit step along the normal
    directions: torch.Tensor               # [G, A, w_dim] unit edit directions
    group_attributes: tuple[str, ...] = ()  # () or GROUP_ATTRIBUTES
    group_weights: torch.Tensor | None = None     # [K, w_dim] least-squares model of each group attribute
    group_intercepts: torch.Tensor | None = None  # [K]
    group_medians: torch.Tensor | None = None     # [K] the medians the samples were split at
    layers: tuple[int, int] | None = None  # default synthesis layers an edit applies to (inclusive); None: all
    options: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)     # base generator: kind, file, bytes, sha256, label, widths
    property_cnn: dict = field(default_factory=dict)  # file, bytes, sha256
    num: int = 0
    seed: int = 0
    fit_quality: dict = field(default_factory=dict)
    score_algorithm: int = 2

    def __post_init__(self):
        self.attributes, self.held_attributes = tuple(self.attributes), tuple(self.held_attributes)
        self.group_attributes = tuple(self.group_attributes)
        self.layers = None if self.layers is None else tuple(self.layers)
        d = self.w_dim
        if self.group_weights is None:
            self.group_weights = torch.zeros(0, d, dtype=torch.float64)
            self.group_intercepts = torch.zeros(0, dtype=torch.float64)
            self.group_medians = torch.zeros(0, dtype=torch.float64)

    @property
    def fitted_attributes(self) -> tuple[str, ...]:
        return self.attributes + self.held_attributes

    @property
    def w_dim(self) -> int:
        return int(self.weights.shape[-1])

    @property
    def num_groups(self) -> int:
        return int(self.weights.shape[0])

    # --- the linear model ---
    def group_of(self, w: torch.Tensor) -> torch.Tensor:
        """Group number [N] of each w (all 0 without groups)."""
        if not self.group_attributes:
            return torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
        predicted = w.double() @ self.group_weights.to(w.device).T + self.group_intercepts.to(w.device)
        above = (predicted > self.group_medians.to(w.device)).long()
        bits = 2 ** torch.arange(above.shape[1] - 1, -1, -1, device=w.device)
        return (above * bits).sum(dim=1)

    def _model(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.group_of(w)
        return self.weights.to(w.device)[group], self.intercepts.to(w.device)[group]  # [N, F, d], [N, F]

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        """Predicted scores [N, F] (float64) of the fitted attributes, in ``fitted_attributes`` order."""
        weights, intercepts = self._model(w)
        return torch.einsum('nfd,nd->nf', weights, w.double()) + intercepts

    def edit(self, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """w + Δw: the move along the normals after which the predicted scores of ``attributes`` equal ``targets``
        [N, A] and those of ``held_attributes`` are unchanged (ridge: the smallest such move). Returns w's dtype."""
        if targets.ndim != 2 or tuple(targets.shape) != (w.shape[0], len(self.attributes)):
            raise ValueError(f'targets must have shape [{w.shape[0]}, {len(self.attributes)}], got {list(targets.shape)}')
        group = self.group_of(w)
        current = self.predict(w)
        residual = torch.zeros_like(current)
        residual[:, :len(self.attributes)] = targets.to(w.device, torch.float64) - current[:, :len(self.attributes)]
        delta = torch.einsum('ndf,nf->nd', self.pseudo_inverses().to(w.device)[group], residual)
        return (w.double() + delta).to(w.dtype)

    def pseudo_inverses(self) -> torch.Tensor:
        """[G, w_dim, F]: per group, the map from score residuals to Δw, Nᵀ (A Nᵀ)⁺ (computed once)."""
        if getattr(self, '_pinv', None) is None or self._pinv_of is not self.weights:
            if self.method == 'svm':
                normals = self.normals.transpose(1, 2)  # [G, d, F]
                self._pinv = normals @ torch.linalg.pinv(self.weights @ normals)
            else:  # the same map for N = A / |A|, computed without squaring A's condition number
                self._pinv = torch.linalg.pinv(self.weights)
            self._pinv_of = self.weights
        return self._pinv

    # --- the file ---
    def to_dict(self) -> dict:
        """The file's content: plain types and float64 tensors only (loads with ``weights_only=True``)."""
        record = {'format': FILE_FORMAT, 'version': FILE_VERSION, 'method': self.method,
                  'attributes': list(self.attributes), 'held_attributes': list(self.held_attributes),
                  'group_attributes': list(self.group_attributes), 'layers': None if self.layers is None else list(self.layers),
                  'options': dict(self.options), 'generator': dict(self.generator),
                  'property_cnn': dict(self.property_cnn), 'num': int(self.num), 'seed': int(self.seed),
                  'fit_quality': self.fit_quality, 'score_algorithm': int(self.score_algorithm)}
        for key in TENSOR_KEYS:
            record[key] = getattr(self, key).detach().to('cpu', torch.float64).contiguous()
        return record

    @classmethod
    def from_dict(cls, record: dict, source: str = 'the record') -> 'AttributeDirections':
        _validate(record, source)
        kwargs = {key: record[key].to(torch.float64) for key in TENSOR_KEYS}
        for key in ('method', 'attributes', 'held_attributes', 'group_attributes', 'layers', 'options', 'generator',
                    'property_cnn', 'num', 'seed', 'fit_quality', 'score_algorithm'):
            kwargs[key] = record[key]
        return cls(**kwargs)


def _validate(record, source: str) -> None:
    """One ``PipelineError`` line for anything that is not a complete, consistent, finite directions record."""
    def bad(problem: str) -> PipelineError:
        return PipelineError(f'{source} {problem}; expected an {WHAT}')

    if not isinstance(record, dict) or record.get('format') != FILE_FORMAT:
        raise bad('is not an attribute-directions file (no format marker)')
    if record.get('version') != FILE_VERSION:
        raise bad(f'has format version {record.get("version")!r}, this code reads version {FILE_VERSION}')
    missing = [k for k in (*TENSOR_KEYS, 'method', 'attributes', 'held_attributes', 'group_attributes', 'layers',
                           'options', 'generator', 'property_cnn', 'num', 'seed', 'fit_quality', 'score_algorithm')
               if k not in record]
    if missing:
        raise bad(f'lacks {", ".join(missing[:3])}')
    if record['method'] not in METHODS:
        raise bad(f'names an unknown method {record["method"]!r}')
    names = [*record['attributes'], *record['held_attributes']]
    if not record['attributes'] or any(n not in PROPERTY_NAMES for n in names) or len(set(names)) != len(names):
        raise bad(f'lists invalid attributes {names}')
    tensors = {k: record[k] for k in TENSOR_KEYS}
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values()):
        raise bad('holds non-tensor or non-float values where tensors belong')
    weights = tensors['weights']
    if weights.ndim != 3 or weights.shape[0] < 1 or weights.shape[1] != len(names) or weights.shape[2] < 1:
        raise bad(f'has weights of shape {list(weights.shape)} for {len(names)} fitted attributes')
    groups, fitted, width = weights.shape
    groups_named = len(record['group_attributes'])
    shapes = {'intercepts': (groups, fitted), 'normals': (groups, fitted, width), 'slopes': (groups, fitted),
              'directions': (groups, len(record['attributes']), width), 'group_weights': (groups_named, width),
              'group_intercepts': (groups_named,), 'group_medians': (groups_named,)}
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise bad(f'has {key} of shape {list(tensors[key].shape)}, expected {list(shape)}')
    if groups != 2 ** groups_named:
        raise bad(f'has {groups} groups for {groups_named} group attributes')
    broken = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if broken:
        raise bad(f'holds NaN or infinite values ({", ".join(broken[:3])})')
    layers = record['layers']
    if layers is not None and not (isinstance(layers, list) and len(layers) == 2
                                   and all(isinstance(v, int) for v in layers) and 0 <= layers[0] <= layers[1]):
        raise bad(f'has an invalid layer range {layers!r}')
    generator = record['generator']
    if not isinstance(generator, dict) or not {'kind', 'file', 'sha256', 'z_dim', 'w_dim'} <= set(generator):
        raise bad('does not identify its base generator')
    for key in ('z_dim', 'w_dim', 'num_layers'):
        value = generator.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f'records an invalid base generator {key} {value!r}')
    if generator['w_dim'] != width:
        raise bad(f'records a w width of {generator["w_dim"]} but holds directions of width {width}')
    _validate_label(generator.get('kind'), generator.get('label'), bad)


def _validate_label(kind, label, bad) -> None:
    """The sampling label must fit the base generator: none for the unconditional original, LABEL_SIZE finite
    numbers for v1 (whose mapping takes one); anything else would fail deep inside the generator."""
    if kind == 'original' and label is not None:
        raise bad(f'gives the unconditional base generator (original) a sampling label {_short(label)}; it takes '
                  'none (label None)')
    if kind == 'v1':
        numbers = isinstance(label, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in label)
        if not numbers or len(label) != LABEL_SIZE:
            raise bad(f'has the sampling label {_short(label)} for the v1 base generator; it needs {LABEL_SIZE} '
                      'finite numbers')


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'



def write_directions(path: str | Path, directions: AttributeDirections) -> None:
    atomic.torch_save(path, directions.to_dict())


def read_directions(path: str | Path) -> AttributeDirections:
    """The directions of a file; a missing, corrupt or foreign file is one ``PipelineError`` line naming it."""
    path = Path(path)
    return AttributeDirections.from_dict(read_checkpoint(path, WHAT), str(path))
