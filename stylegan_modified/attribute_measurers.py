"""Measuring the seven property scores of generated images: the property CNN or the stage-3/4 parsing path.

A measurer turns a batch of images (uint8 RGB, N x H x W x 3, as they were written and read back) into an
(N, 7) float64 array of z-scores in the standard order (``ohlora.layout.PROPERTY_NAMES``), in the score space
of its ``algorithm``; a row of NaN means "not measured" (e.g. no face found). ``settings()`` lists everything
that decides its numbers (weights checksums, statistics, rounding): it keys the evaluation's run folder.
``image_size`` is the (height, width) it needs, or None for any size.

Any object with these members plugs into the evaluation (the tests use one that reads values back from pixels).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.records import sha256_of
from ohlora.weights import SOURCES, fetch
from stylegan_modified.attribute_metrics import SCORE_DECIMALS
from stylegan_modified.checkpoint import PROPERTY_CNN_SOURCE, load_property_cnn
from stylegan_modified.delivered_images import CNN_INPUT, cnn_input

MEASURES = ('property-cnn', 'parsing')


@runtime_checkable
class Measurer(Protocol):
    name: str                          # 'property-cnn', 'parsing', ...
    algorithm: int                     # property-score algorithm of its z-scores (1 or 2)
    image_size: tuple[int, int] | None  # (height, width) it reads, None for any

    def settings(self) -> dict: ...

    def measure(self, images: np.ndarray) -> np.ndarray:
        """(N, 7) float64 z-scores of uint8 RGB images (N, H, W, 3); NaN rows where nothing was measured."""
        ...


def fetch_as(key: str, layout: Layout, override: str | Path | None, option: str) -> Path:
    """:func:`ohlora.weights.fetch` whose messages name this tool's ``option`` instead of ``--weights``."""
    if override is not None and not Path(override).is_file():
        raise PipelineError(f'{option} {override}: no such file (expected the {SOURCES[key].description})')
    try:
        return fetch(key, layout, override)
    except PipelineError as exc:
        raise type(exc)(str(exc).replace('--weights PATH', f'{option} PATH')) from None


class PropertyCNNMeasurer:
    """The published v2 property CNN (the instrument v3 was trained and tested with), eval mode, batched.

    Input as in training: uint8 / 127.5 - 1 (ToTensor + Normalize(0.5, 0.5)). Scores are rounded to 4
    decimals, as upstream's v3 test rounds them before computing r and MAE.
    """
    name = 'property-cnn'
    algorithm = 2
    image_size = (256, 256)

    def __init__(self, cnn: torch.nn.Module, weights_sha256: str | None):
        self.cnn = cnn.eval()
        self._settings = {'measure': self.name, 'algorithm': self.algorithm, 'weights_sha256': weights_sha256,
                          'mode': 'eval', 'input': CNN_INPUT, 'decimals': SCORE_DECIMALS}

    def settings(self) -> dict:
        return dict(self._settings)

    @torch.inference_mode()
    def measure(self, images: np.ndarray) -> np.ndarray:
        scores = self.cnn(cnn_input(images, next(self.cnn.parameters()).device)).to('cpu', torch.float64).numpy()
        return np.round(scores, SCORE_DECIMALS)


def property_cnn_measurer(layout: Layout, path: str | Path | None, device: torch.device) -> PropertyCNNMeasurer:
    """The property CNN of ``--property-cnn PATH``, else the root's copy of the published file (downloaded)."""
    weights = fetch_as(PROPERTY_CNN_SOURCE, layout, path, '--property-cnn')
    return PropertyCNNMeasurer(load_property_cnn(weights, device), sha256_of(weights))


def statistics_path(layout: Layout, algorithm: int, stats: str | Path | None) -> Path:
    """The stage-4 statistics that map raw scores of ``algorithm`` to z-scores; checked to exist and fit."""
    path = Path(stats) if stats is not None else layout.property_scores_stats(algorithm)
    if not path.is_file():
        where = '--stats' if stats is not None else 'this root'
        raise PipelineError(f'{path}: no such statistics file ({where}); --measure parsing maps raw algorithm-'
                            f'{algorithm} scores to z-scores with the statistics stage 4 saved: run '
                            'compute_property_scores.py under this --root, or pass --stats FILE')
    try:
        recorded = json.loads(path.read_text(encoding='utf-8')).get('algorithm')
    except (OSError, ValueError, AttributeError):
        recorded = None  # read_stats gives the precise message
    if recorded not in (None, algorithm):
        raise PipelineError(f'{path} holds the statistics of algorithm {recorded}, not of algorithm {algorithm}; '
                            f'pass the matching file with --stats, or --algorithm {recorded}')
    return path


def parsing_measurer(layout: Layout, algorithm: int, stats: str | Path | None, facexformer: str | Path | None,
                     device: torch.device):
    """MTCNN -> FaceXFormer -> algorithm 1 or 2 -> z-scores with saved stage-4 statistics (all in memory)."""
    from segmentation.face_detection import FaceDetector
    from segmentation.facexformer import load_facexformer
    from segmentation.parsing_measurer import ParsingMeasurer
    from segmentation.score_normalization import read_stats

    stats_file = statistics_path(layout, algorithm, stats)
    # The file must say it holds this algorithm's statistics, as stage 4 requires: normalising with the other
    # algorithm's mean and std gives plausible-looking, wrong z-scores. Checked before the 1.1 GB parser is fetched.
    column_stats = read_stats(stats_file, algorithm)
    weights = fetch_as('facexformer', layout, facexformer, '--facexformer')
    parser = load_facexformer(weights, device)
    settings = {'facexformer_sha256': sha256_of(weights), 'statistics_sha256': sha256_of(stats_file)}
    return ParsingMeasurer(parser, FaceDetector(), algorithm, column_stats, settings)
