"""GenForce's StyleGAN (v1) discriminator, re-implemented from the specification (MODELS.md §2).

Names follow GenForce (``input{b}`` FromRGB per resolution, ``layer{k}`` convs/denses, ``lod``), so a
zoo checkpoint's ``discriminator`` state_dict loads strictly. ``forward(image, label=None, lod=None)``
takes RGB images in [-1, 1] and returns raw logits [N, 1] (no sigmoid).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stylegan.genforce_layers import (INIT_RES, LRELU_SLOPE, WSCALE_GAIN, BlurLayer, DenseLayer, channels_at,
                                      check_resolution, downsample_average, resolve_fused_scale, runtime_scale,
                                      scalar_buffer, shifted_window_sum)

__all__ = ['StyleGANDiscriminator', 'MiniBatchSTDLayer']


class MiniBatchSTDLayer(nn.Module):
    """Appends the per-group standard deviation of the features as extra channels.

    Groups are *strided*: the batch is viewed as [G, N/G, ...], so sample i shares its group with
    i ± N/G, i ± 2N/G, ... (GenForce and StyleGAN); grouping consecutive samples gives other logits.
    """

    def __init__(self, group_size: int = 4, new_channels: int = 1, epsilon: float = 1e-8):
        super().__init__()
        self.group_size = group_size
        self.new_channels = new_channels
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size <= 1:
            return x
        n, c, h, w = x.shape
        group = min(self.group_size, n)
        if n % group:
            raise ValueError(f'batch size {n} is not a multiple of the minibatch-std group size {group}')
        y = x.reshape(group, -1, self.new_channels, c // self.new_channels, h, w)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)
        y = torch.sqrt(y + self.epsilon)
        y = y.mean(dim=[2, 3, 4])
        y = y.reshape(-1, self.new_channels, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f'group_size={self.group_size}, new_channels={self.new_channels}'


class DiscriminatorConv(nn.Module):
    """``input{b}`` / ``layer{k}``: [minibatch std] -> [blur] -> conv + bias -> [avg-pool] -> LeakyReLU.

    ``downsample`` is None, 'pool' (3x3 conv, bias, 2x2 average pool) or 'fused' (one stride-2 conv with
    the 4x4 kernel averaging the four shifted 3x3 copies; numerically the same maths).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, downsample: str | None = None,
                 mbstd: MiniBatchSTDLayer | None = None, use_wscale: bool = True):
        super().__init__()
        self.downsample = downsample
        self.padding = kernel_size // 2
        fan_in = in_channels * kernel_size * kernel_size
        self.wscale, init_std = runtime_scale(fan_in, WSCALE_GAIN, 1.0, use_wscale)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * init_std)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if downsample:
            self.blur = BlurLayer(in_channels)
        self.mbstd = mbstd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        if self.downsample:
            x = self.blur(x)  # before the conv in D (after it in G)
        weight = self.weight * self.wscale
        if self.downsample == 'fused':
            x = F.conv2d(x, shifted_window_sum(weight) * 0.25, self.bias, stride=2, padding=1)
        else:
            x = F.conv2d(x, weight, self.bias, stride=1, padding=self.padding)
            if self.downsample == 'pool':
                x = downsample_average(x)
        return F.leaky_relu(x, LRELU_SLOPE)

    def extra_repr(self) -> str:
        return f'downsample={self.downsample!r}, wscale={self.wscale:.6g}'


class StyleGANDiscriminator(nn.Module):
    """GenForce ``StyleGANDiscriminator`` with its constructor keywords, defaults and state_dict names."""

    def __init__(self, resolution: int, image_channels: int = 3, label_size: int = 0, fused_scale='auto',
                 use_wscale: bool = True, minibatch_std_group_size: int = 4, minibatch_std_channels: int = 1,
                 fmaps_base: int = 16 << 10, fmaps_max: int = 512):
        super().__init__()
        final_log2 = check_resolution(resolution)
        resolve_fused_scale(fused_scale, INIT_RES)  # validates the value
        self.config = dict(resolution=resolution, image_channels=image_channels, label_size=label_size,
                           fused_scale=fused_scale, use_wscale=use_wscale,
                           minibatch_std_group_size=minibatch_std_group_size,
                           minibatch_std_channels=minibatch_std_channels, fmaps_base=fmaps_base, fmaps_max=fmaps_max)
        self.resolution = resolution
        self.image_channels = image_channels
        self.label_size = label_size
        self.num_blocks = final_log2 - int(math.log2(INIT_RES)) + 1
        self.register_buffer('lod', torch.zeros(()))

        def nf(res):
            return channels_at(res, fmaps_base, fmaps_max)

        for block in range(self.num_blocks):
            res = resolution >> block
            self.add_module(f'input{block}', DiscriminatorConv(image_channels, nf(res), kernel_size=1,
                                                               use_wscale=use_wscale))
            if res > INIT_RES:
                down = 'fused' if resolve_fused_scale(fused_scale, res) else 'pool'
                self.add_module(f'layer{2 * block}', DiscriminatorConv(nf(res), nf(res), use_wscale=use_wscale))
                self.add_module(f'layer{2 * block + 1}', DiscriminatorConv(nf(res), nf(res // 2), downsample=down,
                                                                           use_wscale=use_wscale))
            else:
                mbstd = MiniBatchSTDLayer(minibatch_std_group_size, minibatch_std_channels)
                self.add_module(f'layer{2 * block}', DiscriminatorConv(nf(res) + minibatch_std_channels, nf(res),
                                                                       mbstd=mbstd, use_wscale=use_wscale))
                self.add_module(f'layer{2 * block + 1}', DenseLayer(nf(res) * res * res, nf(res // 2),
                                                                    use_wscale=use_wscale))
        self.final_layer_name = f'layer{2 * self.num_blocks}'
        self.add_module(self.final_layer_name, DenseLayer(nf(INIT_RES // 2), max(label_size, 1),
                                                          use_wscale=use_wscale, gain=1.0, activate=False))

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None,
                lod: float | None = None) -> torch.Tensor:
        if self.label_size and (label is None or tuple(label.shape) != (image.shape[0], self.label_size)):
            got = None if label is None else list(label.shape)
            raise ValueError(f'label must have shape [{image.shape[0]}, {self.label_size}], got {got}')
        x = getattr(self, self.final_layer_name)(self.features(image, lod))
        if self.label_size:
            x = torch.sum(x * label, dim=1, keepdim=True)
        return x

    def features(self, image: torch.Tensor, lod: float | None = None) -> torch.Tensor:
        """The input of the final dense layer [N, C]; conditional variants (Oh-LoRA) put their own head on it."""
        expected = (self.image_channels, self.resolution, self.resolution)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f'image must have shape [N, {", ".join(map(str, expected))}], got {list(image.shape)}')
        lod = scalar_buffer(self, 'lod') if lod is None else lod
        max_lod = self.num_blocks - 1
        if not 0 <= lod <= max_lod:
            raise ValueError(f'lod must be in [0, {max_lod}], got {lod}')

        x = None
        for block in range(self.num_blocks):
            if block <= lod < block + 1:
                x = getattr(self, f'input{block}')(image)
            elif block - 1 < lod < block:
                alpha = lod - np.floor(lod)
                x = getattr(self, f'input{block}')(image) * alpha + x * (1 - alpha)
            if lod < block + 1:
                x = getattr(self, f'layer{2 * block}')(x)
                x = getattr(self, f'layer{2 * block + 1}')(x)
            if lod > block:
                image = downsample_average(image)
        return x
