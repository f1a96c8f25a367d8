"""The gender and image-quality CNNs, with the upstream state_dict names (``convN.0.*``, ``fc1.0.*``, ``fc_final.0.*``).

Both take RGB floats in [0, 1] (``uint8 / 255``, no mean/std normalisation) of shape (N, 3, 256, 256) and
return a sigmoid probability of shape (N, 1): 1 = woman for :class:`GenderCNN`, 1 = good image for
:class:`QualityCNN`. The quality net looks only at the top-centre quarter (rows 0:H/4, columns W/4:3W/4),
where the generator's blur defects appear; it crops inside ``forward`` so both nets take the same input.

Every conv is 3x3 without padding, followed by LeakyReLU (PyTorch's default slope 0.01) and Dropout2d(0.05).
Dropout makes scores random unless the model is in ``eval()`` mode. The v2 property-score CNN
(:mod:`stylegan_modified.property_score_cnn`) is built from the same blocks, with a 256-wide ``fc1``.
"""
from __future__ import annotations

import torch
from torch import nn

CONV_DROPOUT = 0.05
FC_DROPOUT = 0.45
HIDDEN = 512


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3), nn.LeakyReLU(),
                         nn.Dropout2d(CONV_DROPOUT))


def hidden_block(in_features: int, out_features: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.Tanh(), nn.Dropout(FC_DROPOUT))


def output_block() -> nn.Sequential:
    return nn.Sequential(nn.Linear(HIDDEN, 1), nn.Sigmoid())


def pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, 2)


class GenderCNN(nn.Module):
    """Whole 256x256 image -> P(woman). 256 -> 254 -> 252 -> 126 -> 124 -> 62 -> 60 -> 30 -> 28 -> 14 -> 12 -> 6."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_block(3, 32)
        self.conv2 = conv_block(32, 64)
        self.pool1 = pool()
        self.conv3 = conv_block(64, 128)
        self.pool2 = pool()
        self.conv4 = conv_block(128, 128)
        self.pool3 = pool()
        self.conv5 = conv_block(128, 256)
        self.pool4 = pool()
        self.conv6 = conv_block(256, 256)
        self.pool5 = pool()
        self.fc1 = hidden_block(256 * 6 * 6)
        self.fc_final = output_block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.pool2(self.conv3(x))
        x = self.pool3(self.conv4(x))
        x = self.pool4(self.conv5(x))
        x = self.pool5(self.conv6(x))
        return self.fc_final(self.fc1(x.flatten(1)))


def top_centre_crop(x: torch.Tensor) -> torch.Tensor:
    """Rows 0:H/4 and columns W/4:3W/4; for 256x256 images the 64-high, 128-wide strip above the face."""
    height, width = x.shape[-2:]
    return x[:, :, :height // 4, width // 4:3 * width // 4]


class QualityCNN(nn.Module):
    """Top-centre 64x128 crop -> P(good). 62x126 -> 60x124 -> 30x62 -> 28x60 -> 14x30 -> 12x28 -> 6x14 -> 4x12."""

    def __init__(self):
        super().__init__()
        # The same first layers as GenderCNN, written out: each class lists upstream's layers (state-dict names) whole.
        self.conv1 = conv_block(3, 32)
        self.conv2 = conv_block(32, 64)
        self.pool1 = pool()
        self.conv3 = conv_block(64, 128)
        self.pool2 = pool()
        self.conv4 = conv_block(128, 128)
        self.pool3 = pool()
        self.conv5 = conv_block(128, 256)
        self.fc1 = hidden_block(256 * 4 * 12)
        self.fc_final = output_block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = top_centre_crop(x)
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.pool2(self.conv3(x))
        x = self.pool3(self.conv4(x))
        x = self.conv5(x)
        return self.fc_final(self.fc1(x.flatten(1)))


MODEL_CLASSES: dict[str, type[nn.Module]] = {'gender': GenderCNN, 'quality': QualityCNN}
