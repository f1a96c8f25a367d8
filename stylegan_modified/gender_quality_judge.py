"""Stage 2's judges on generated images in memory: share still judged female, share judged good quality.

Both ensembles (five folds each, eval mode, the stage-2 input ``uint8 / 255`` at 256x256) score every image;
an image counts as female when the gender ensemble mean is >= 0.7 and as good when the quality mean is
>= 0.9, the thresholds of the stage-2 filter that built the fine-tuning set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnn.ensemble import ensemble_outputs, final_scores, load_ensemble, published_weights
from cnn.images import IMAGE_HW, to_unit_range
from cnn.properties import PROPERTIES
from ohlora.constants import NUM_FOLDS
from ohlora.errors import PipelineError, WeightsUnavailable
from ohlora.layout import Layout, cnn_model_name
from ohlora.records import sha256_of

JUDGED = ('gender', 'quality')
THRESHOLDS = {prop: PROPERTIES[prop].keep_threshold for prop in JUDGED}  # gender 0.7, quality 0.9
SHARE_NAMES = {'gender': 'female', 'quality': 'good_quality'}


class EnsembleJudge:
    image_size = IMAGE_HW

    def __init__(self, ensembles: dict[str, list[torch.nn.Module]], weights_sha256: dict[str, list[str]] | None = None):
        self.ensembles = ensembles
        self._settings = {'thresholds': dict(THRESHOLDS), 'input': 'uint8 / 255', 'mode': 'eval',
                          'weights_sha256': weights_sha256 or {}}

    def settings(self) -> dict:
        return dict(self._settings)

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Ensemble means (rounded to 4 decimals, as stage 2) per property of uint8 RGB images (N, H, W, 3)."""
        result = {}
        for prop, models in self.ensembles.items():
            device = next(models[0].parameters()).device
            x = to_unit_range(torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2))
            result[prop] = final_scores(ensemble_outputs(models, x))
        return result


def load_judge(layout: Layout, weights_dir: str | Path | None,
               device: torch.device) -> tuple[EnsembleJudge | None, str]:
    """(judge, '') or, when the default weights are missing and cannot be downloaded, (None, why in one line).

    An explicit ``--cnn-weights DIR`` that lacks a file is an error, not a silent omission.
    """
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise PipelineError(f'--cnn-weights {weights_dir}: no such folder (expected {cnn_model_name("gender", 0)} … '
                            f'{cnn_model_name("quality", NUM_FOLDS - 1)})')
    paths = {}
    for prop in JUDGED:
        try:
            paths[prop] = published_weights(prop, layout, weights_dir)
        except WeightsUnavailable:
            return None, (f'the stage-2 {prop} ensemble is not in {layout.cnn_models_dir} and cannot be '
                          'downloaded here; pass --cnn-weights DIR')
        except PipelineError as exc:  # fetch names --weights for a missing override file
            raise PipelineError(str(exc).replace('--weights', '--cnn-weights')) from None
    ensembles = {prop: load_ensemble(prop, files, device) for prop, files in paths.items()}
    digests = {prop: [sha256_of(p) for p in files] for prop, files in paths.items()}
    return EnsembleJudge(ensembles, digests), ''
