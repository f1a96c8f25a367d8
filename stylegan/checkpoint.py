"""Loading GenForce model-zoo checkpoints into :class:`StyleGANGenerator` / :class:`StyleGANDiscriminator`.

A zoo file is ``{'generator', 'discriminator', 'generator_smooth'}`` (training snapshots nest the three
under ``'models'``). The constructor widths are read from the tensor shapes, so any checkpoint of the
GenForce StyleGAN topology loads, whatever its resolution and channel widths. Settings that leave no
trace in the shapes (mapping_lr_mul, fused_scale, use_wscale, final_tanh, the minibatch-std group size)
keep GenForce's defaults, which are the zoo's.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.errors import PipelineError
from stylegan.genforce_layers import INIT_RES, channels_at
from stylegan.stylegan_discriminator import StyleGANDiscriminator
from stylegan.stylegan_generator import StyleGANGenerator

ZOO_KEYS = ('generator', 'discriminator', 'generator_smooth')
GENERATOR_KEYS = ('generator', 'generator_smooth')
WHAT = 'GenForce StyleGAN zoo checkpoint'


def unwrap_zoo_checkpoint(obj: dict) -> dict:
    """The ``{name: state_dict}`` dict of a zoo file or training snapshot (``'models'`` unwrapped).

    A ``module.`` prefix (DataParallel) is stripped from a state_dict only when every key has it.
    """
    if isinstance(obj.get('models'), dict):
        obj = obj['models']
    unwrapped = {}
    for name, value in obj.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) and k.startswith('module.') for k in value):
            value = {k[len('module.'):]: v for k, v in value.items()}
        unwrapped[name] = value
    return unwrapped


def _indices(state_dict: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted(int(m.group(1)) for k in state_dict if (m := regex.fullmatch(k)))


def _shape(state_dict: dict, key: str, ndim: int) -> tuple[int, ...]:
    value = state_dict.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f'it has no tensor {key!r}')
    if value.ndim != ndim:
        raise ValueError(f'{key} has shape {list(value.shape)}, not {ndim} dimensions')
    return tuple(value.shape)


def infer_fmaps(channels: dict[int, int]) -> tuple[int, int]:
    """(fmaps_base, fmaps_max) such that ``min(fmaps_base // res, fmaps_max)`` gives ``channels[res]``."""
    fmaps_max = max(channels.values())
    low, high = 1, float('inf')  # the bounds on fmaps_base
    for res, c in channels.items():
        if c < fmaps_max:  # below the cap: fmaps_base // res == c
            low, high = max(low, c * res), min(high, c * res + res - 1)
        else:  # at the cap: fmaps_base // res >= fmaps_max
            low = max(low, fmaps_max * res)
    if low > high or any(channels_at(res, low, fmaps_max) != c for res, c in channels.items()):
        raise ValueError('its channel widths per resolution do not follow min(fmaps_base // res, fmaps_max): '
                         + ', '.join(f'{res}: {c}' for res, c in sorted(channels.items())))
    return low, fmaps_max


def infer_generator_kwargs(state_dict: dict) -> dict:
    """StyleGANGenerator kwargs that reproduce the shapes of a generator state_dict (ValueError if not one)."""
    dense = _indices(state_dict, r'mapping\.dense(\d+)\.weight')
    outputs = _indices(state_dict, r'synthesis\.output(\d+)\.weight')
    if not dense or dense != list(range(len(dense))) or not outputs or outputs != list(range(len(outputs))):
        raise ValueError('it has no mapping.dense0.weight or no synthesis.output0.weight')
    num_blocks = len(outputs)
    dense0_out, dense0_in = _shape(state_dict, 'mapping.dense0.weight', 2)
    label_size, z_space_dim = 0, dense0_in
    if 'mapping.label_weight' in state_dict:
        label_size, embedding_dim = _shape(state_dict, 'mapping.label_weight', 2)
        z_space_dim = dense0_in - embedding_dim
        if embedding_dim != z_space_dim:  # GenForce embeds the label to the width of z
            raise ValueError(f'its label embedding ({embedding_dim}) is not as wide as z ({z_space_dim}), as in '
                             'GenForce; an Oh-LoRA conditional generator needs its own class')
    w_space_dim = _shape(state_dict, 'synthesis.layer0.style.weight', 2)[1]
    mapping_out = _shape(state_dict, f'mapping.dense{dense[-1]}.weight', 2)[0]
    channels = {INIT_RES << b: _shape(state_dict, f'synthesis.layer{2 * b + 1}.bias', 1)[0]
                for b in range(num_blocks)}
    fmaps_base, fmaps_max = infer_fmaps(channels)
    return dict(resolution=INIT_RES << (num_blocks - 1), z_space_dim=z_space_dim, w_space_dim=w_space_dim,
                label_size=label_size, mapping_layers=len(dense),
                mapping_fmaps=dense0_out if len(dense) > 1 else 512,  # a single layer has no hidden width
                repeat_w=mapping_out == w_space_dim,
                image_channels=_shape(state_dict, 'synthesis.output0.weight', 4)[0],
                const_input='synthesis.layer0.const' in state_dict, fmaps_base=fmaps_base, fmaps_max=fmaps_max)


def infer_discriminator_kwargs(state_dict: dict) -> dict:
    """StyleGANDiscriminator kwargs that reproduce the shapes of a discriminator state_dict."""
    inputs = _indices(state_dict, r'input(\d+)\.weight')
    if not inputs or inputs != list(range(len(inputs))):
        raise ValueError('it has no input0.weight')
    num_blocks = len(inputs)
    resolution = INIT_RES << (num_blocks - 1)
    last = 2 * num_blocks - 2  # the minibatch-std conv at 4x4
    channels = {resolution >> b: _shape(state_dict, f'input{b}.weight', 4)[0] for b in range(num_blocks)}
    channels[INIT_RES // 2] = _shape(state_dict, f'layer{last + 1}.weight', 2)[0]
    fmaps_base, fmaps_max = infer_fmaps(channels)
    outputs = _shape(state_dict, f'layer{last + 2}.weight', 2)[0]
    return dict(resolution=resolution,
                image_channels=_shape(state_dict, 'input0.weight', 4)[1],
                label_size=outputs if outputs > 1 else 0,
                minibatch_std_channels=_shape(state_dict, f'layer{last}.weight', 4)[1] - channels[INIT_RES],
                fmaps_base=fmaps_base, fmaps_max=fmaps_max)


def _select(path: Path, key: str) -> dict:
    obj = unwrap_zoo_checkpoint(read_checkpoint(path, WHAT))
    state_dict = obj.get(key)
    if not isinstance(state_dict, dict):
        found = ', '.join(repr(k) for k in list(obj)[:5]) or 'nothing'
        raise PipelineError(f"{path} has no {key!r} entry (it holds {found}); expected a {WHAT} with the "
                            f"entries {', '.join(ZOO_KEYS)}")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise PipelineError(f'{path}: the {key!r} entry holds values other than tensors; not a {WHAT}')
    return state_dict


def _build(cls, infer, state_dict: dict, path: Path, key: str, device):
    try:
        model = cls(**infer(state_dict))
    except ValueError as exc:
        raise PipelineError(f'{path}: the {key!r} entry is not a GenForce {cls.__name__} state_dict: {exc}') from None
    load_strict(model, state_dict, path, f'GenForce {cls.__name__} ({key!r} entry)')
    return model.to(device).eval()


def load_generator(path: str | Path, key: str = 'generator', device='cpu') -> StyleGANGenerator:
    """The generator of a zoo checkpoint, in eval mode, on ``device``.

    ``key`` is ``'generator'`` (what Oh-LoRA samples from; the default) or ``'generator_smooth'`` (the
    moving average of the weights, which GenForce's own synthesize.py prefers).
    """
    if key not in GENERATOR_KEYS:
        raise PipelineError(f'unknown generator entry {key!r}; choose one of {", ".join(GENERATOR_KEYS)}')
    path = Path(path)
    generator = _build(StyleGANGenerator, infer_generator_kwargs, _select(path, key), path, key, device)
    if not torch.any(generator.truncation.w_avg != 0):
        warnings.warn(f"{path}: the {key!r} entry's truncation.w_avg is all zeros (GenForce never updates it in "
                      f"generator_smooth), so truncation with trunc_psi < 1 would pull towards w = 0", stacklevel=2)
    if generator.synthesis.lod.item() != 0:
        warnings.warn(f"{path}: the {key!r} entry's synthesis.lod is {generator.synthesis.lod.item():g}, not 0, "
                      f"so images come from a lower-resolution stage unless lod=0 is passed", stacklevel=2)
    return generator


def load_discriminator(path: str | Path, device='cpu') -> StyleGANDiscriminator:
    """The discriminator of a zoo checkpoint, in eval mode, on ``device``."""
    path = Path(path)
    return _build(StyleGANDiscriminator, infer_discriminator_kwargs, _select(path, 'discriminator'), path,
                  'discriminator', device)
