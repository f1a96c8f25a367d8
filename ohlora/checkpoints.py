"""Reading checkpoint files safely and loading them strictly, with errors that name the file."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ohlora.errors import PipelineError, first_line


def read_checkpoint(path: str | Path, what: str, map_location='cpu') -> dict:
    """``torch.load(weights_only=True)`` of a dict-of-tensors file; a clear one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f'{path}: no such file (expected the {what})')
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc, 160)
        raise PipelineError(f'{path} holds objects other than tensors and cannot be loaded safely '
                            f'(expected the {what}): {first}') from None
    except Exception as exc:  # truncated/corrupt files fail deep inside torch with many exception types
        first = first_line(exc, 160)
        raise PipelineError(f'{path} is not a readable PyTorch checkpoint, truncated or corrupt? '
                            f'(expected the {what}): {first}') from None
    if not isinstance(obj, dict):
        raise PipelineError(f'{path} holds a {type(obj).__name__}, not a state_dict (expected the {what})')
    return obj


def _examples(items, limit=3) -> str:
    items = list(items)
    shown = ', '.join(items[:limit])
    return shown + (f', … ({len(items)} in all)' if len(items) > limit else '')


def state_dict_mismatch(module: nn.Module, state_dict: dict) -> str | None:
    """None when ``state_dict`` fits ``module`` exactly (names and shapes); else a short description."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [f'{k} {list(state_dict[k].shape)} vs {list(v.shape)}' for k, v in expected.items()
                if k in state_dict and hasattr(state_dict[k], 'shape') and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys ({_examples(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ({_examples(unexpected)})')
    if reshaped:
        parts.append(f'{len(reshaped)} shape mismatches, file vs model ({_examples(reshaped)})')
    return '; '.join(parts) or None


def check_finite_weights(state_dict: dict, path: str | Path, what: str) -> None:
    """Refuse NaN or infinite weights in one line: they load fine and then give black or NaN outputs."""
    damaged = [k for k, v in state_dict.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:
        raise PipelineError(f'{path} holds NaN or infinite values ({_examples(damaged)}); the file is damaged '
                            f'(expected the {what})')


def load_strict(module: nn.Module, state_dict: dict, path: str | Path, what: str) -> nn.Module:
    """``load_state_dict(strict=True)`` after checking names, shapes and finiteness, so a wrong or damaged file
    gets one clear line."""
    problem = state_dict_mismatch(module, state_dict)
    if problem:
        raise PipelineError(f'{path} does not fit the {what}: {problem}')
    check_finite_weights(state_dict, path, what)
    module.load_state_dict(state_dict, strict=True)
    return module
