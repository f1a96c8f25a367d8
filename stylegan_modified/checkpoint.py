"""Loading the Oh-LoRA conditional StyleGAN files, with the checks of MODELS.md §6.6.

The published files are plain state_dicts (``torch.save(model.state_dict())``). The constructor widths are
read from the tensor shapes (GenForce's inference, :mod:`stylegan.checkpoint`, plus the label width and the
embedding width), so tiny checkpoints of the same topology load through the same code. The variant follows
from ``mapping.label_weight``: v1/v2 (7, 16), v3 (7, 24), v4 (3, 16); the discriminator's label width is
``layer14``'s fan-in minus ``layer13``'s width: v1 7, v4 3.

A file that is not the one asked for (a v1 generator given for v3, a GenForce zoo file, a CNN, …) is named
in one line by :func:`describe_checkpoint`. The v2 property-score CNN and the v3 CVAE encoder load through
:func:`load_property_cnn` and :func:`load_cvae_encoder` with the same messages.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.constants import LABEL_SIZE
from ohlora.errors import PipelineError
from ohlora.layout import DISCRIMINATOR_FILES, GENERATOR_FILES, PROPERTY_CNN_FILE, Layout
from ohlora.weights import SOURCES, fetch
from stylegan.checkpoint import infer_discriminator_kwargs, infer_generator_kwargs
from stylegan.genforce_layers import blur_kernel
from stylegan_modified.cvae_encoder import CVAEEncoder, flat_features
from stylegan_modified.property_score_cnn import PropertyScoreCNN
from stylegan_modified.stylegan_discriminator import DISCRIMINATOR_CLASSES
from stylegan_modified.stylegan_generator import GENERATOR_CLASSES

# (label size, embedding width) of each generator variant; v1 and v2 share one layout. v4 reads 3 values.
GENERATOR_LABEL_SHAPES = {'v1': (LABEL_SIZE, 16), 'v2': (LABEL_SIZE, 16), 'v3': (LABEL_SIZE, 24), 'v4': (3, 16)}
DISCRIMINATOR_LABEL_SIZES = {'v1': LABEL_SIZE, 'v4': 3}


class WrongCheckpoint(PipelineError):
    """The file is a readable checkpoint of another model; ``found`` says which (e.g. 'generator v1')."""

    def __init__(self, message: str, found: str | None = None):
        super().__init__(message)
        self.found = found


def _tensor_dict(obj) -> dict | None:
    """The state_dict inside ``obj`` (``{'state_dict': sd}`` unwrapped, an all-keys ``module.`` prefix stripped)."""
    if isinstance(obj.get('state_dict'), dict) and len(obj) <= 3:
        obj = obj['state_dict']
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(isinstance(k, str) and k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return obj


def _optional_shape(state_dict: dict, key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def generator_variant(label_shape: tuple[int, ...] | None) -> str | None:
    """'v1' (also v2's layout), 'v3' or 'v4' for a ``mapping.label_weight`` shape; None for other shapes."""
    for variant in ('v1', 'v3', 'v4'):
        if label_shape == GENERATOR_LABEL_SHAPES[variant]:
            return variant
    return None


def discriminator_label_size(state_dict: dict) -> int | None:
    """Width of the label concatenated before ``layer{last}`` (0 for GenForce's D); None if not a D."""
    inputs = sum(1 for k in state_dict if k.startswith('input') and k.endswith('.weight'))
    last, hidden = _optional_shape(state_dict, f'layer{2 * inputs}.weight'), _optional_shape(state_dict, f'layer{2 * inputs - 1}.weight')
    if not inputs or last is None or hidden is None or len(last) != 2 or len(hidden) != 2:
        return None
    return last[1] - hidden[0] if last[0] == 1 else 0


def describe_checkpoint(obj) -> tuple[str, str | None]:
    """(what the loaded object is, in words; a short kind such as 'generator v3' or None) for messages."""
    if not isinstance(obj, dict):
        return f'a {type(obj).__name__}, not a state_dict', None
    if {'generator', 'discriminator'} & set(obj) and all(isinstance(v, dict) for v in obj.values()):
        return f'a GenForce model-zoo checkpoint (entries {", ".join(map(str, obj))})', 'genforce zoo'
    if isinstance(obj.get('models'), dict):
        return 'a GenForce training snapshot (entry models)', 'genforce zoo'
    if 'state_dict_backbone' in obj:
        return 'the FaceXFormer checkpoint', 'facexformer'
    state_dict = _tensor_dict(obj)
    if state_dict is None:
        return f'a dict of {len(obj)} entries that is no state_dict (e.g. {", ".join(map(str, list(obj)[:3]))})', None

    label = _optional_shape(state_dict, 'mapping.label_weight')
    if label is not None and len(label) == 2:
        variant = generator_variant(label)
        z = (_optional_shape(state_dict, 'mapping.dense0.weight') or (0, 0))[1] - label[1]
        size = '' if z == 512 else f', z width {z}'
        if variant is None:
            return (f'a conditional StyleGAN generator with label_weight {label[0]}x{label[1]}{size}, which is no '
                    'Oh-LoRA variant'), 'generator'
        name = 'v1 (or v2)' if variant == 'v1' else variant
        return f'an Oh-LoRA {name} generator (label_weight {label[0]}x{label[1]}{size})', f'generator {variant}'
    if 'mapping.dense0.weight' in state_dict and 'synthesis.layer0.style.weight' in state_dict:
        return 'an unconditional GenForce StyleGAN generator state_dict (no mapping.label_weight)', 'genforce generator'
    label_size = discriminator_label_size(state_dict)
    if label_size is not None:
        if label_size == 0:
            return 'a GenForce StyleGAN discriminator state_dict (no label input)', 'genforce discriminator'
        variant = next((v for v, n in DISCRIMINATOR_LABEL_SIZES.items() if n == label_size), None)
        if variant is None:
            return f'a conditional StyleGAN discriminator with a {label_size}-value label', 'discriminator'
        return f'an Oh-LoRA {variant} discriminator ({label_size}-value label)', f'discriminator {variant}'
    if any(k.startswith('eyes_score_cnn.') for k in state_dict):
        return f'the Oh-LoRA v2 property-score CNN ({PROPERTY_CNN_FILE})', 'property cnn'
    if 'fc2_mu.weight' in state_dict:
        return 'the Oh-LoRA v3 CVAE encoder', 'cvae encoder'
    fc1 = _optional_shape(state_dict, 'fc1.0.weight')
    if 'conv1.0.weight' in state_dict and fc1 is not None:
        kind = {9216: 'gender', 12288: 'quality'}.get(fc1[-1])
        return (f'an Oh-LoRA {kind} CNN' if kind else 'a CNN state_dict'), f'{kind} cnn'
    return (f'a state_dict of {len(state_dict)} tensors that is no StyleGAN '
            f'(first keys: {", ".join(list(state_dict)[:3])})'), None


def _wrong_file(path: Path, description: str, found: str | None, expected: str) -> WrongCheckpoint:
    return WrongCheckpoint(f'{path} is {description}, not the {expected}', found)


def infer_conditional_generator_kwargs(state_dict: dict) -> dict:
    """Constructor kwargs (GenForce's + ``label_size``, ``label_convert_dim``) reproducing the file's shapes."""
    label = _optional_shape(state_dict, 'mapping.label_weight')
    dense0 = _optional_shape(state_dict, 'mapping.dense0.weight')
    if label is None or len(label) != 2 or dense0 is None or len(dense0) != 2 or dense0[1] <= label[1]:
        raise ValueError('it has no mapping.label_weight [L, E] with mapping.dense0.weight [*, z + E]')
    label_size, embedding_dim = label
    # GenForce's inference sees an unconditional generator whose dense0 reads z alone.
    unconditional = {k: v for k, v in state_dict.items() if k != 'mapping.label_weight'}
    unconditional['mapping.dense0.weight'] = torch.empty(dense0[0], dense0[1] - embedding_dim, device='meta')
    kwargs = infer_generator_kwargs(unconditional)
    kwargs.update(label_size=label_size, label_convert_dim=embedding_dim)
    return kwargs


def infer_conditional_discriminator_kwargs(state_dict: dict) -> dict:
    label_size = discriminator_label_size(state_dict)
    if not label_size:
        raise ValueError('its last layer reads no label')
    kwargs = infer_discriminator_kwargs(state_dict)
    kwargs['label_size'] = label_size
    return kwargs


def _read(path: str | Path, expected: str) -> tuple[Path, dict]:
    path = Path(path)
    return path, read_checkpoint(path, expected)


def _check_after_loading(model, state_dict: dict, path: Path, lod_owner) -> None:
    """MODELS.md §6.6: float32 tensors, lod 0, the standard blur kernels; warnings, the file still works."""
    other = sorted({str(v.dtype).removeprefix('torch.') for v in state_dict.values() if v.dtype != torch.float32})
    if other:
        warnings.warn(f'{path}: tensors of dtype {", ".join(other)} (the published files are float32); '
                      'they were converted', stacklevel=4)
    if lod_owner.lod.item() != 0:
        warnings.warn(f'{path}: lod is {lod_owner.lod.item():g}, not 0, so the images come from a lower-resolution '
                      'stage; the published files have 0', stacklevel=4)
    for name, buffer in model.named_buffers():
        if name.endswith('blur.kernel') and not torch.equal(buffer.cpu(), blur_kernel(buffer.shape[0])):
            warnings.warn(f'{path}: {name} is not the [1,2,1]x[1,2,1]/16 blur kernel of StyleGAN', stacklevel=4)
            break


def _build(cls, infer_kwargs, state_dict: dict, path: Path, expected: str, device):
    """``cls`` with the widths of ``state_dict``, loaded strictly, checked, on ``device``, in eval mode."""
    try:
        kwargs = infer_kwargs(state_dict)
    except ValueError as exc:
        raise PipelineError(f'{path}: not a {cls.__name__} state_dict: {exc}') from None
    model = cls(**kwargs)
    load_strict(model, state_dict, path, f'{cls.__name__} ({expected})')
    # generators keep lod in their synthesis module, discriminators on themselves
    _check_after_loading(model, state_dict, path, getattr(model, 'synthesis', model))
    return model.to(device).eval()


def load_conditional_generator(path: str | Path, variant: str = 'v3', device='cpu'):
    """The Oh-LoRA generator ``variant`` ('v1', 'v2', 'v3', 'v4') of a state_dict file, in eval mode."""
    if variant not in GENERATOR_CLASSES:
        raise PipelineError(f'unknown generator variant {variant!r}; choose one of {", ".join(GENERATOR_CLASSES)}')
    cls = GENERATOR_CLASSES[variant]
    expected = f'Oh-LoRA {variant} generator ({GENERATOR_FILES[variant]})'
    path, obj = _read(path, expected)
    description, found = describe_checkpoint(obj)
    state_dict = _tensor_dict(obj) if isinstance(obj, dict) else None
    wanted = 'generator v1' if variant == 'v2' else f'generator {variant}'
    if state_dict is None or found != wanted:
        raise _wrong_file(path, description, found, expected)
    return _build(cls, infer_conditional_generator_kwargs, state_dict, path, expected, device)


def load_conditional_discriminator(path: str | Path, variant: str = 'v1', device='cpu'):
    """The Oh-LoRA discriminator ``variant`` ('v1', 'v4') of a state_dict file, in eval mode."""
    if variant not in DISCRIMINATOR_CLASSES:
        raise PipelineError(f'unknown discriminator variant {variant!r}; choose one of '
                            f'{", ".join(DISCRIMINATOR_CLASSES)}')
    cls = DISCRIMINATOR_CLASSES[variant]
    expected = f'Oh-LoRA {variant} discriminator ({DISCRIMINATOR_FILES[variant]})'
    path, obj = _read(path, expected)
    description, found = describe_checkpoint(obj)
    state_dict = _tensor_dict(obj) if isinstance(obj, dict) else None
    if state_dict is None or found != f'discriminator {variant}':
        raise _wrong_file(path, description, found, expected)
    return _build(cls, infer_conditional_discriminator_kwargs, state_dict, path, expected, device)


PROPERTY_CNN_SOURCE = 'v2_property_cnn'  # ohlora.weights.SOURCES key of the published file
PROPERTY_CNN_EXPECTED = (f'{SOURCES[PROPERTY_CNN_SOURCE].description} '
                         f'({SOURCES[PROPERTY_CNN_SOURCE].hf_file})')
CVAE_ENCODER_EXPECTED = 'Oh-LoRA v3 CVAE encoder'


def _state_dict_of_kind(path: str | Path, expected: str, wanted: str) -> tuple[Path, dict]:
    """The state_dict of ``path`` if :func:`describe_checkpoint` calls it ``wanted`` and every value is finite."""
    path, obj = _read(path, expected)
    description, found = describe_checkpoint(obj)
    state_dict = _tensor_dict(obj)
    if state_dict is None or found != wanted:
        raise _wrong_file(path, description, found, expected)
    broken = [k for k, v in state_dict.items() if not bool(torch.isfinite(v).all())]
    if broken:
        shown = ', '.join(broken[:3]) + (f', … ({len(broken)} in all)' if len(broken) > 3 else '')
        raise PipelineError(f'{path} holds NaN or infinite values ({shown}); expected the {expected}')
    other = sorted({str(v.dtype).removeprefix('torch.') for v in state_dict.values() if v.dtype != torch.float32})
    if other:
        warnings.warn(f'{path}: tensors of dtype {", ".join(other)} (the {expected} is float32); they were converted',
                      stacklevel=3)
    return path, state_dict


def load_property_cnn(path: str | Path, device='cpu') -> PropertyScoreCNN:
    """The v2 property-score CNN of a state_dict file (strict, weights_only), on ``device``, in eval mode."""
    path, state_dict = _state_dict_of_kind(path, PROPERTY_CNN_EXPECTED, 'property cnn')
    model = load_strict(PropertyScoreCNN(), state_dict, path, f'PropertyScoreCNN ({PROPERTY_CNN_EXPECTED})')
    return model.to(device).eval()


def published_property_cnn(layout: Layout, device='cpu', override: str | Path | None = None) -> PropertyScoreCNN:
    """The property CNN from ``override``, else the root's copy of the published file (downloaded if missing)."""
    return load_property_cnn(fetch(PROPERTY_CNN_SOURCE, layout, override), device)


def infer_cvae_encoder_kwargs(state_dict: dict) -> dict:
    """``latent_dim``, ``label_size`` and ``hidden_dim`` reproducing an encoder state_dict's shapes."""
    fc1, mu = _optional_shape(state_dict, 'fc1.0.weight'), _optional_shape(state_dict, 'fc2_mu.weight')
    if fc1 is None or mu is None or len(fc1) != 2 or len(mu) != 2:
        raise ValueError('it has no fc1.0.weight and fc2_mu.weight matrices')
    hidden_dim, label_size = fc1[0], fc1[1] - flat_features()
    if label_size < 1 or mu[1] != hidden_dim + label_size:
        raise ValueError(f'fc1.0.weight {list(fc1)} and fc2_mu.weight {list(mu)} do not fit a '
                         f'{flat_features()}-value feature map plus one label read twice')
    return {'latent_dim': mu[0], 'label_size': label_size, 'hidden_dim': hidden_dim}


def load_cvae_encoder(path: str | Path, device='cpu') -> CVAEEncoder:
    """The v3 CVAE encoder of a state_dict file (widths read from its shapes), on ``device``, in eval mode."""
    path, state_dict = _state_dict_of_kind(path, CVAE_ENCODER_EXPECTED, 'cvae encoder')
    try:
        kwargs = infer_cvae_encoder_kwargs(state_dict)
    except ValueError as exc:
        raise PipelineError(f'{path}: not a CVAEEncoder state_dict: {exc}') from None
    model = load_strict(CVAEEncoder(**kwargs), state_dict, path, f'CVAEEncoder ({CVAE_ENCODER_EXPECTED})')
    return model.to(device).eval()
