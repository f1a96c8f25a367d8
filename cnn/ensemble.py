"""Loading the five fold models of a property and scoring image batches with all of them at once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cnn.models import MODEL_CLASSES
from ohlora.checkpoints import load_strict, read_checkpoint
from ohlora.constants import CNN_PROPERTIES, NUM_FOLDS
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.weights import cnn_key, fetch


def model_description(prop: str, fold: int) -> str:
    return f'{prop} CNN state_dict of fold {fold}'


def load_model(prop: str, path: str | Path, device: torch.device | str = 'cpu',
               factory: Callable[[], nn.Module] | None = None, fold: int = 0) -> nn.Module:
    """A fold model loaded strictly from a plain state_dict (weights_only), on ``device``, in eval mode."""
    what = model_description(prop, fold)
    state_dict = read_checkpoint(path, what)
    odd = [k for k, v in state_dict.items() if not torch.is_tensor(v) or v.dtype != torch.float32]
    if odd:
        raise PipelineError(f'{path} holds non-float32 entries ({", ".join(odd[:3])}); expected the {what}')
    model = (factory or MODEL_CLASSES[prop])()
    load_strict(model, state_dict, path, what)
    return model.to(device).eval()


def published_weights(prop: str, layout: Layout, weights_dir: str | Path | None = None) -> list[Path]:
    """The fold files: from ``weights_dir`` if given, else ``Layout.cnn_models_dir`` (downloaded when absent)."""
    if weights_dir is None:
        return [fetch(cnn_key(prop, fold), layout) for fold in range(NUM_FOLDS)]
    folder = Path(weights_dir)
    names = [layout.cnn_model(p, fold).name for p in CNN_PROPERTIES for fold in range(NUM_FOLDS)]
    wanted = f'a folder holding {names[0]} … {names[-1]}, the ten fold files'
    if not folder.is_dir():
        raise PipelineError(f'--weights {folder}: no such folder (expected {wanted})')
    paths = [folder / layout.cnn_model(prop, fold).name for fold in range(NUM_FOLDS)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise PipelineError(f'--weights {folder} has no {", ".join(missing)} (expected {wanted})')
    return paths


def channels_last(models: list[nn.Module]) -> list[nn.Module]:
    """The models with channels-last weights, in place: 1.5-2x faster convolutions for these 3x3 stacks on
    oneDNN (CPU) and cuDNN; :func:`ensemble_outputs` feeds them channels-last batches."""
    return [model.to(memory_format=torch.channels_last) for model in models]


def load_ensemble(prop: str, paths: list[Path], device: torch.device) -> list[nn.Module]:
    return channels_last([load_model(prop, path, device, fold=fold) for fold, path in enumerate(paths)])


def set_dropout(models: list[nn.Module], active: bool) -> None:
    """Upstream scored loaded models without ``eval()``: dropout on (compat). The default is eval mode."""
    for model in models:
        model.train(active)


@torch.inference_mode()
def ensemble_outputs(models: list[nn.Module], images01: torch.Tensor) -> np.ndarray:
    """Sigmoid outputs of every model for a batch: float32 array of shape (N, len(models))."""
    images01 = images01.contiguous(memory_format=torch.channels_last)
    outputs = [model(images01).reshape(-1) for model in models]
    return torch.stack(outputs, dim=1).float().cpu().numpy()


def round4(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64), 4)


def final_scores(outputs: np.ndarray) -> np.ndarray:
    """The ensemble score: mean of the unrounded model outputs, rounded to 4 decimals like upstream."""
    return round4(np.asarray(outputs, dtype=np.float64).mean(axis=1))
