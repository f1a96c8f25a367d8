"""Constructed generators and scorers with known answers, for the attribute-direction tests.

``LinearToy``: z -> w = z @ M (M = I gives isotropic w); its "image" is wp itself ([N, 1, L, d]), so the
layers an edit touched can be read back. ``LinearScorer``: the 7 scores are A · mean_l(wp_l) + b plus a
noise of std ``sigma`` that is a fixed pseudo-random function of the image (so rescoring the same image
gives the same value, as the real CNN in eval mode does). ``PooledScorer``: for real (tiny) StyleGAN
images, a fixed random linear map of the 4x4 average-pooled image: cheap, deterministic, image-dependent.
"""
from __future__ import annotations

import math

import torch


class LinearToy:
    def __init__(self, dim: int = 16, num_layers: int = 4, mixing: float = 0.0, seed: int = 1):
        self.z_dim = self.w_dim = dim
        self.num_layers = num_layers
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.eye(dim) + mixing * torch.randn(dim, dim, generator=gen) / math.sqrt(dim)

    @property
    def device(self) -> torch.device:
        return torch.device('cpu')

    def w(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() @ self.matrix

    def images(self, wp: torch.Tensor) -> torch.Tensor:
        return wp.float()[:, None]

    def wp(self, w: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(1).expand(-1, self.num_layers, -1)


class LinearScorer:
    def __init__(self, weights: torch.Tensor, intercepts: torch.Tensor, sigma: float = 0.1, seed: int = 5):
        self.weights, self.intercepts, self.sigma = weights.float(), intercepts.float(), sigma
        self.probe = torch.randn(7, weights.shape[1], generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        return w.float() @ self.weights.T + self.intercepts

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = images[:, 0].mean(dim=1)
        # sqrt(2) sin(fast phase): std 1, and effectively independent of the linear part
        noise = math.sqrt(2.0) * torch.sin(1e3 * (x @ self.probe.T))
        return self.exact(x) + self.sigma * noise


class FailingScorer:
    """Raises after ``calls`` successful calls: an interruption in the middle of a sampling run."""

    def __init__(self, scorer, calls: int):
        self.scorer, self.left = scorer, calls

    def __call__(self, images):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.scorer(images)


class PooledScorer:
    def __init__(self, seed: int = 3):
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(7, 48, generator=gen) / math.sqrt(48)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return pooled @ self.matrix.T.to(images.device)


def random_model(dim: int, seed: int = 2, correlated: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [7, dim], b [7]); with ``correlated`` > 0 hair_color's direction shares that much of eyes' (cosine)."""
    gen = torch.Generator().manual_seed(seed)
    weights, intercepts = torch.randn(7, dim, generator=gen), torch.randn(7, generator=gen)
    if correlated:
        eyes = weights[0] / weights[0].norm()
        other = weights[1] - (weights[1] @ eyes) * eyes
        other = other / other.norm()
        weights[1] = 3.0 * (correlated * eyes + math.sqrt(1 - correlated ** 2) * other)
    return weights, intercepts
