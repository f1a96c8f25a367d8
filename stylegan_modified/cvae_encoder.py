"""The v3 conditional-VAE encoder: (image in [-1, 1], label) -> (mu, log sigma^2) of a generator z (PIPELINE.md §7.4).

Five 4x4 stride-2 convolutions with reflect padding 1, each followed by LeakyReLU(0.01): channels 3 -> 32 -> 64
-> 128 -> 128 -> 256, spatial 256 -> 128 -> 64 -> 32 -> 16 -> 8. The flattened map (NCHW, 16,384 values) and
the label go through ``fc1`` (Linear -> 512, ELU); its output and the label again go through ``fc2_mu`` and
``fc2_var``, whose output is used as the log-variance. There is no dropout, so train and eval mode agree.

Keys: ``conv1..5.0.*``, ``fc1.0.*``, ``fc2_mu.*``, ``fc2_var.*``. The defaults are the upstream shape (z 512,
label 7, 9,877,600 parameters); ``latent_dim`` follows the z width of the generator being trained, so tiny test
generators get a matching encoder.
"""
from __future__ import annotations

import torch
from torch import nn

from ohlora.constants import IMAGE_SIZE, LABEL_SIZE

CHANNELS = (32, 64, 128, 128, 256)
PARAMETERS = 9_877_600  # the upstream encoder (not published)


def down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1,
                                   padding_mode='reflect'), nn.LeakyReLU())


def flat_features(image_size: int = IMAGE_SIZE) -> int:
    return CHANNELS[-1] * (image_size >> len(CHANNELS)) ** 2


class CVAEEncoder(nn.Module):
    def __init__(self, latent_dim: int = 512, label_size: int = LABEL_SIZE, hidden_dim: int = 512):
        super().__init__()
        self.latent_dim, self.label_size = latent_dim, label_size
        previous = 3
        for index, channels in enumerate(CHANNELS, start=1):
            self.add_module(f'conv{index}', down_block(previous, channels))
            previous = channels
        self.fc1 = nn.Sequential(nn.Linear(flat_features() + label_size, hidden_dim), nn.ELU())
        self.fc2_mu = nn.Linear(hidden_dim + label_size, latent_dim)
        self.fc2_var = nn.Linear(hidden_dim + label_size, latent_dim)

    @classmethod
    def for_generator(cls, generator: nn.Module) -> CVAEEncoder:
        """An encoder whose z and label widths are those of a conditional ``generator`` (e.g. a tiny test one)."""
        return cls(latent_dim=generator.z_space_dim, label_size=generator.label_size)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 256, 256) images in [-1, 1] and (N, label_size) labels -> (mu, logvar), each (N, latent_dim)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f'the CVAE encoder takes (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, not {tuple(x.shape)}')
        if label.shape != (x.shape[0], self.label_size):
            raise ValueError(f'the CVAE encoder takes ({x.shape[0]}, {self.label_size}) labels, not {tuple(label.shape)}')
        for index in range(1, len(CHANNELS) + 1):
            x = getattr(self, f'conv{index}')(x)
        label = label.to(x.dtype)
        hidden = self.fc1(torch.cat([x.flatten(1), label], dim=1))
        hidden = torch.cat([hidden, label], dim=1)
        return self.fc2_mu(hidden), self.fc2_var(hidden)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mu + noise * exp(logvar / 2); the caller draws ``noise`` ~ N(0, I) from its own seeded generator."""
    return mu + noise * torch.exp(0.5 * logvar)
