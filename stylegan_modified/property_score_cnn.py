"""The v2 property-score CNN: a 256x256 image in [-1, 1] -> the seven property scores (PIPELINE.md §7.3).

Six independent sub-CNNs, each looking at its own fixed region of the image (cropped inside ``forward``):

| sub-net (key prefix)     | rows x cols   | conv stack (P = 2x2 max-pool)  | flatten | outputs |
|--------------------------|---------------|--------------------------------|---------|---------|
| ``eyes_score_cnn``       | 96:144, 64:192| 32 64 P 64 P 128 P             | 7168    | 1       |
| ``mouth_score_cnn``      | 160:208,96:160| 32 64 P 64 P 128 P             | 3072    | 1       |
| ``pose_score_cnn``       | 112:160,88:168| 32 64 P 64 P 128 128           | 10752   | 1       |
| ``hair_color_score_cnn`` | all           | 32 64 P 64 P 128 P 128 P 128 P | 4608    | 1       |
| ``hair_length_score_cnn``| 128:256, all  | 32 64 P 64 P 128 P 128 P 128   | 6144    | 1       |
| ``background_score_cnn`` | 0:128, all    | 32 64 P 64 P 128 P 128 P 128   | 6144    | 2       |

The convolutions are the stage-2 blocks (3x3 unpadded, LeakyReLU 0.01, Dropout2d 0.05), then fc1 (Linear -> 256,
Tanh, Dropout 0.45) and a plain Linear ``fc_final`` (keys ``…fc_final.weight``, no ``.0.``). The output columns are
in the standard label order (eyes, hair_color, hair_length, mouth, pose, background_mean, background_std), which is
not the order the sub-nets are stored in. Scores are deterministic only in ``eval()`` mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnn.models import conv_block, hidden_block, pool
from ohlora.constants import IMAGE_SIZE, PROPERTY_NAMES

SUB_HIDDEN = 256
PARAMETERS = 11_516_807  # the published stylegan_gen_fine_tuned_v2_cnn.pth
P = 'P'


@dataclass(frozen=True)
class SubNetSpec:
    rows: tuple[int, int]
    cols: tuple[int, int]
    stack: tuple            # output channels of each conv, P for a max-pool
    flat: int               # channels x height x width after the stack
    outputs: tuple[str, ...]


FULL = (0, IMAGE_SIZE)
# In registration (= state_dict) order.
SUB_NETS: dict[str, SubNetSpec] = {
    'eyes_score_cnn': SubNetSpec((96, 144), (64, 192), (32, 64, P, 64, P, 128, P), 128 * 4 * 14, ('eyes',)),
    'mouth_score_cnn': SubNetSpec((160, 208), (96, 160), (32, 64, P, 64, P, 128, P), 128 * 4 * 6, ('mouth',)),
    'pose_score_cnn': SubNetSpec((112, 160), (88, 168), (32, 64, P, 64, P, 128, 128), 128 * 6 * 14, ('pose',)),
    'hair_color_score_cnn': SubNetSpec(FULL, FULL, (32, 64, P, 64, P, 128, P, 128, P, 128, P), 128 * 6 * 6,
                                       ('hair_color',)),
    'hair_length_score_cnn': SubNetSpec((128, 256), FULL, (32, 64, P, 64, P, 128, P, 128, P, 128), 128 * 4 * 12,
                                        ('hair_length',)),
    'background_score_cnn': SubNetSpec((0, 128), FULL, (32, 64, P, 64, P, 128, P, 128, P, 128), 128 * 4 * 12,
                                       ('background_mean', 'background_std')),
}


class ScoreSubCNN(nn.Module):
    """One region's scorer: crop, ``conv1..convK`` with pools between, ``fc1``, ``fc_final``."""

    def __init__(self, spec: SubNetSpec):
        super().__init__()
        self.spec = spec
        self.order: list[str] = []
        channels, convs, pools = 3, 0, 0
        for item in spec.stack:
            if item == P:
                pools += 1
                name, module = f'pool{pools}', pool()
            else:
                convs += 1
                name, module = f'conv{convs}', conv_block(channels, item)
                channels = item
            self.add_module(name, module)
            self.order.append(name)
        self.fc1 = hidden_block(spec.flat, SUB_HIDDEN)
        self.fc_final = nn.Linear(SUB_HIDDEN, len(spec.outputs))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = self.spec.rows, self.spec.cols
        return x[:, :, top:bottom, left:right]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.crop(x)
        for name in self.order:
            x = getattr(self, name)(x)
        return self.fc_final(self.fc1(x.flatten(1)))


# Where each sub-net's output columns go in the (N, 7) result.
_COLUMN_ORDER = [name for spec in SUB_NETS.values() for name in spec.outputs]
_TO_STANDARD = [_COLUMN_ORDER.index(name) for name in PROPERTY_NAMES]


class PropertyScoreCNN(nn.Module):
    """(N, 3, 256, 256) RGB in [-1, 1] -> (N, 7) scores in the order of ``ohlora.layout.PROPERTY_NAMES``."""

    def __init__(self):
        super().__init__()
        for prefix, spec in SUB_NETS.items():
            self.add_module(prefix, ScoreSubCNN(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            # the crops are fixed pixel boxes of a 256x256 image; any other size would score the wrong regions
            raise ValueError(f'the property CNN takes (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, not {tuple(x.shape)}')
        scores = torch.cat([getattr(self, prefix)(x) for prefix in SUB_NETS], dim=1)
        return scores[:, _TO_STANDARD]
