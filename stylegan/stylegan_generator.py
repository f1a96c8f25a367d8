"""GenForce's StyleGAN (v1) generator, re-implemented from the specification (MODELS.md §1).

Module and parameter names are GenForce's, so a zoo checkpoint's ``generator`` (or ``generator_smooth``)
state_dict loads with ``load_state_dict(strict=True)``; buffers (noise maps, blur kernels, ``w_avg``,
``lod``) are persistent, as upstream. Three sub-modules can be called on their own:

* ``mapping(z, label=None)`` -> ``{'z': pixel-normalised z, 'label', 'w'}``
* ``truncation(w, trunc_psi=None, trunc_layers=None)`` -> wp ``[N, num_layers, w_dim]``
* ``synthesis(wp, lod=None, randomize_noise=False)`` -> ``{'wp', 'style00'.., 'image'}``

The operation order inside every layer is GenForce's, because the reference outputs are compared bit
for bit: [upsample] -> conv (scaled weight, no bias) -> [blur] -> + noise * strength -> + bias ->
LeakyReLU(0.2) -> instance norm -> x * (scale + 1) + shift.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stylegan.genforce_layers import (INIT_RES, LRELU_SLOPE, WSCALE_GAIN, BlurLayer, DenseLayer, channels_at,
                                      check_resolution, resolve_fused_scale, runtime_scale, scalar_buffer,
                                      shifted_window_sum, upsample_nearest)

__all__ = ['StyleGANGenerator', 'MappingModule', 'TruncationModule', 'SynthesisModule']

EPSILON = 1e-8


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(torch.mean(x.square(), dim=1, keepdim=True) + EPSILON)


def instance_norm(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    mean = torch.mean(x, dim=[2, 3], keepdim=True)
    x = x.sub_(mean) if inplace else x - mean
    norm = torch.sqrt(torch.mean(x.square(), dim=[2, 3], keepdim=True) + EPSILON)
    return x.div_(norm) if inplace else x / norm


class MappingModule(nn.Module):
    """z (and an optional label) -> w: pixel norm, then ``num_layers`` dense layers, each with LeakyReLU.

    With ``label_size > 0`` the label is embedded (``label @ label_weight``, no bias, no scaling) and
    concatenated to z before the pixel norm. GenForce's embedding has the width of z; ``embedding_dim``
    lets a conditional variant (Oh-LoRA) choose another width.
    """

    def __init__(self, input_space_dim: int = 512, hidden_space_dim: int = 512, final_space_dim: int = 512,
                 label_size: int = 0, num_layers: int = 8, use_wscale: bool = True, lr_mul: float = 0.01,
                 embedding_dim: int | None = None):
        super().__init__()
        self.input_space_dim = input_space_dim
        self.label_size = label_size
        self.embedding_dim = (input_space_dim if embedding_dim is None else embedding_dim) if label_size else 0
        self.num_layers = num_layers
        if label_size:  # registered first, as in the Oh-LoRA conditional files (names are what loading needs)
            self.label_weight = nn.Parameter(torch.randn(label_size, self.embedding_dim))
        for i in range(num_layers):
            in_features = input_space_dim + self.embedding_dim if i == 0 else hidden_space_dim
            out_features = final_space_dim if i == num_layers - 1 else hidden_space_dim
            self.add_module(f'dense{i}', DenseLayer(in_features, out_features, use_wscale=use_wscale,
                                                    gain=WSCALE_GAIN, lr_mul=lr_mul))

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        if z.ndim != 2 or z.shape[1] != self.input_space_dim:
            raise ValueError(f'z must have shape [N, {self.input_space_dim}], got {list(z.shape)}')
        embedding = None
        if self.label_size:
            if label is None or label.ndim != 2 or tuple(label.shape) != (z.shape[0], self.label_size):
                got = None if label is None else list(label.shape)
                raise ValueError(f'label must have shape [{z.shape[0]}, {self.label_size}], got {got}')
            embedding = torch.matmul(label, self.label_weight)
            z = torch.cat((z, embedding), dim=1)
        z = pixel_norm(z)
        w = z
        for i in range(self.num_layers):
            w = getattr(self, f'dense{i}')(w)
        results = {'z': z, 'label': label, 'w': w}
        if embedding is not None:
            results['embedding'] = embedding
        return results


class TruncationModule(nn.Module):
    """w -> wp (one code per synthesis layer), optionally pulled towards ``w_avg`` on the first layers."""

    def __init__(self, w_space_dim: int, num_layers: int, repeat_w: bool = True):
        super().__init__()
        self.w_space_dim = w_space_dim
        self.num_layers = num_layers
        self.repeat_w = repeat_w
        self.register_buffer('w_avg', torch.zeros(w_space_dim if repeat_w else w_space_dim * num_layers))

    def forward(self, w: torch.Tensor, trunc_psi: float | None = None, trunc_layers: int | None = None):
        layers, dim = self.num_layers, self.w_space_dim
        if w.ndim == 2 and self.repeat_w and w.shape[1] == dim:
            wp = w.reshape(-1, 1, dim).repeat(1, layers, 1)
        elif w.ndim == 2 and w.shape[1] == dim * layers:
            wp = w.reshape(-1, layers, dim)
        else:
            wp = w
        if wp.ndim != 3 or tuple(wp.shape[1:]) != (layers, dim):
            raise ValueError(f'w must have shape [N, {dim}] or [N, {layers}, {dim}], got {list(w.shape)}')

        trunc_psi = 1.0 if trunc_psi is None else trunc_psi
        trunc_layers = 0 if trunc_layers is None else trunc_layers
        if trunc_psi < 1.0 and trunc_layers > 0:
            # GenForce's float32 per-layer coefficient, applied to *every* layer (coef 1 rounds too).
            coefs = torch.ones(layers, dtype=torch.float32)
            coefs[:trunc_layers] = trunc_psi
            coefs = coefs.to(wp).reshape(1, layers, 1)
            w_avg = self.w_avg.reshape(1, -1, dim)
            wp = w_avg + (wp - w_avg) * coefs
        return wp


class NoiseLayer(nn.Module):
    """x + noise * strength[c]; the noise map [1, 1, res, res] is stored (``apply_noise.noise``)."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.weight = nn.Parameter(torch.zeros(channels))
        self.register_buffer('noise', torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor, randomize_noise: bool = False, inplace: bool = False) -> torch.Tensor:
        if randomize_noise:
            # Drawn on the CPU generator, layer by layer, so a seed reproduces it on any device.
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution).to(x)
        else:
            noise = self.noise
        term = noise * self.weight.reshape(1, -1, 1, 1)
        return x.add_(term) if inplace else x + term


class StyleModLayer(nn.Module):
    """Affine w -> (scale, shift) per channel; x * (scale + 1) + shift. Returns the raw affine output too."""

    def __init__(self, w_space_dim: int, channels: int, use_wscale: bool = True):
        super().__init__()
        self.channels = channels
        self.wscale, init_std = runtime_scale(w_space_dim, 1.0, 1.0, use_wscale)
        self.weight = nn.Parameter(torch.randn(2 * channels, w_space_dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(2 * channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        style = F.linear(w, self.weight * self.wscale, self.bias)
        scale, shift = style.reshape(-1, 2, self.channels, 1, 1).unbind(dim=1)
        x = x.mul_(scale + 1).add_(shift) if inplace else x * (scale + 1) + shift
        return x, style


class SynthesisLayer(nn.Module):
    """One styled layer, ``synthesis.layer{k}``.

    ``kind`` is 'const' (learned 4x4 input), 'dense' (GenForce's const_input=False: a 4x4 conv on w),
    'conv' (3x3), 'up' (nearest x2, 3x3 conv, blur) or 'fused_up' (transposed conv, blur).
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, resolution: int, w_space_dim: int,
                 use_wscale: bool = True):
        super().__init__()
        self.kind = kind
        # Registration order gives GenForce's state_dict order: bias, const|weight, apply_noise, style, blur.
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if kind == 'const':
            self.const = nn.Parameter(torch.ones(1, out_channels, resolution, resolution))
        else:
            kernel = resolution if kind == 'dense' else 3
            self.wscale, init_std = runtime_scale(in_channels * kernel * kernel, WSCALE_GAIN, 1.0, use_wscale)
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) * init_std)
            self.padding = kernel - 1 if kind == 'dense' else 1
        self.apply_noise = NoiseLayer(out_channels, resolution)
        self.style = StyleModLayer(w_space_dim, out_channels, use_wscale)
        if kind in ('up', 'fused_up'):
            self.blur = BlurLayer(out_channels)

    def forward(self, x: torch.Tensor | None, w: torch.Tensor, randomize_noise: bool = False):
        if self.kind == 'const':
            x = self.const.repeat(w.shape[0], 1, 1, 1)
        else:
            if self.kind == 'dense':  # the 4x4 input is a conv of w seen as a 1x1 image
                x = w.reshape(-1, w.shape[1], 1, 1)
            weight = self.weight * self.wscale
            if self.kind == 'fused_up':
                # Equals nearest x2 + 3x3 conv with the spatially *flipped* kernel, in one pass.
                kernel = shifted_window_sum(weight).permute(1, 0, 2, 3)
                x = F.conv_transpose2d(x, kernel, stride=2, padding=1)
            else:
                if self.kind == 'up':
                    x = upsample_nearest(x)
                x = F.conv2d(x, weight, stride=1, padding=self.padding)
            if self.kind in ('up', 'fused_up'):
                x = self.blur(x)
        # x is now a fresh tensor of this layer. Without autograd the rest runs in place: the same arithmetic
        # (bit-identical), but no full-size temporaries, which is 10-30 % faster on CPU at 256x256.
        inplace = not torch.is_grad_enabled()
        x = self.apply_noise(x, randomize_noise, inplace)
        bias = self.bias.reshape(1, -1, 1, 1)
        x = x.add_(bias) if inplace else x + bias
        x = F.leaky_relu_(x, LRELU_SLOPE) if inplace else F.leaky_relu(x, LRELU_SLOPE)
        x = instance_norm(x, inplace)
        return self.style(x, w, inplace)

    def extra_repr(self) -> str:
        return f'kind={self.kind!r}'


class ToRGBLayer(nn.Module):
    """``synthesis.output{b}``: 1x1 conv (gain 1) + bias, linear."""

    def __init__(self, in_channels: int, image_channels: int, use_wscale: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(image_channels))
        self.wscale, init_std = runtime_scale(in_channels, 1.0, 1.0, use_wscale)
        self.weight = nn.Parameter(torch.randn(image_channels, in_channels, 1, 1) * init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.wscale, stride=1, padding=0)
        return x + self.bias.reshape(1, -1, 1, 1)


class SynthesisModule(nn.Module):
    """wp -> image, two styled layers per resolution from 4x4 up, with GenForce's lod blending."""

    def __init__(self, resolution: int = 1024, w_space_dim: int = 512, image_channels: int = 3,
                 final_tanh: bool = False, const_input: bool = True, fused_scale='auto', use_wscale: bool = True,
                 fmaps_base: int = 16 << 10, fmaps_max: int = 512):
        super().__init__()
        final_log2 = check_resolution(resolution)
        self.resolution = resolution
        self.w_space_dim = w_space_dim
        self.final_tanh = final_tanh
        self.num_blocks = final_log2 - int(math.log2(INIT_RES)) + 1
        self.num_layers = 2 * self.num_blocks
        self.register_buffer('lod', torch.zeros(()))

        def nf(res):
            return channels_at(res, fmaps_base, fmaps_max)

        for block in range(self.num_blocks):
            res = INIT_RES << block
            if block == 0:
                first = (SynthesisLayer('const', nf(res), nf(res), res, w_space_dim, use_wscale) if const_input
                         else SynthesisLayer('dense', w_space_dim, nf(res), res, w_space_dim, use_wscale))
            else:
                kind = 'fused_up' if resolve_fused_scale(fused_scale, res) else 'up'
                first = SynthesisLayer(kind, nf(res // 2), nf(res), res, w_space_dim, use_wscale)
            self.add_module(f'layer{2 * block}', first)
            self.add_module(f'layer{2 * block + 1}', SynthesisLayer('conv', nf(res), nf(res), res, w_space_dim,
                                                                    use_wscale))
            self.add_module(f'output{block}', ToRGBLayer(nf(res), image_channels, use_wscale))

    def forward(self, wp: torch.Tensor, lod: float | None = None, randomize_noise: bool = False) -> dict:
        if wp.ndim != 3 or tuple(wp.shape[1:]) != (self.num_layers, self.w_space_dim):
            raise ValueError(f'wp must have shape [N, {self.num_layers}, {self.w_space_dim}], got {list(wp.shape)}')
        lod = scalar_buffer(self, 'lod') if lod is None else lod
        max_lod = self.num_blocks - 1
        if not 0 <= lod <= max_lod:
            raise ValueError(f'lod must be in [0, {max_lod}], got {lod}')

        results = {'wp': wp}
        x = image = None
        for block in range(self.num_blocks):
            block_lod = max_lod - block  # the lod at which this block's ToRGB is the output
            if lod < block_lod + 1:
                for k in (2 * block, 2 * block + 1):
                    x, style = getattr(self, f'layer{k}')(x, wp[:, k], randomize_noise)
                    results[f'style{k:02d}'] = style
            if block_lod - 1 < lod <= block_lod:
                image = getattr(self, f'output{block}')(x)
            elif block_lod < lod < block_lod + 1:
                alpha = np.ceil(lod) - lod
                image = getattr(self, f'output{block}')(x) * alpha + upsample_nearest(image) * (1 - alpha)
            elif lod >= block_lod + 1:
                image = upsample_nearest(image)
        results['image'] = torch.tanh(image) if self.final_tanh else image
        return results


class StyleGANGenerator(nn.Module):
    """GenForce ``StyleGANGenerator`` with its constructor keywords, defaults and state_dict names.

    ``forward`` follows GenForce: in train mode it moving-averages ``w_avg`` and, with probability
    ``style_mixing_prob``, mixes in the w of a second random z from a random layer on (NumPy's global RNG
    for the decision and cutoff, the device RNG for the z). In eval mode it does neither, so call
    ``eval()`` for inference.
    """

    def __init__(self, resolution: int, z_space_dim: int = 512, w_space_dim: int = 512, label_size: int = 0,
                 mapping_layers: int = 8, mapping_fmaps: int = 512, mapping_lr_mul: float = 0.01,
                 repeat_w: bool = True, image_channels: int = 3, final_tanh: bool = False,
                 const_input: bool = True, fused_scale='auto', use_wscale: bool = True,
                 noise_type: str = 'spatial', fmaps_base: int = 16 << 10, fmaps_max: int = 512):
        super().__init__()
        if noise_type != 'spatial':
            raise ValueError(f"only noise_type='spatial' (GenForce's default) is supported, not {noise_type!r}")
        resolve_fused_scale(fused_scale, INIT_RES)  # validates the value
        self.config = dict(resolution=resolution, z_space_dim=z_space_dim, w_space_dim=w_space_dim,
                           label_size=label_size, mapping_layers=mapping_layers, mapping_fmaps=mapping_fmaps,
                           mapping_lr_mul=mapping_lr_mul, repeat_w=repeat_w, image_channels=image_channels,
                           final_tanh=final_tanh, const_input=const_input, fused_scale=fused_scale,
                           use_wscale=use_wscale, noise_type=noise_type, fmaps_base=fmaps_base, fmaps_max=fmaps_max)
        self.resolution = resolution
        self.z_space_dim = z_space_dim
        self.w_space_dim = w_space_dim
        self.label_size = label_size
        self.num_layers = 2 * (check_resolution(resolution) - int(math.log2(INIT_RES)) + 1)
        mapping_space_dim = w_space_dim if repeat_w else w_space_dim * self.num_layers

        self.mapping = MappingModule(input_space_dim=z_space_dim, hidden_space_dim=mapping_fmaps,
                                     final_space_dim=mapping_space_dim, label_size=label_size,
                                     num_layers=mapping_layers, use_wscale=use_wscale, lr_mul=mapping_lr_mul)
        self.truncation = TruncationModule(w_space_dim, self.num_layers, repeat_w)
        self.synthesis = SynthesisModule(resolution=resolution, w_space_dim=w_space_dim,
                                         image_channels=image_channels, final_tanh=final_tanh,
                                         const_input=const_input, fused_scale=fused_scale, use_wscale=use_wscale,
                                         fmaps_base=fmaps_base, fmaps_max=fmaps_max)

    @staticmethod
    def batch_w_mean(w: torch.Tensor) -> torch.Tensor:
        """The batch mean of w that train mode moving-averages into ``w_avg``: this process's batch. A trainer on
        several processes sets an instance attribute of this name that returns the mean over every process's batch
        (:func:`stylegan_modified.ddp.batch_w_mean`)."""
        return w.mean(dim=0)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None, lod: float | None = None,
                w_moving_decay: float | None = 0.995, style_mixing_prob: float | None = 0.9,
                trunc_psi: float | None = None, trunc_layers: int | None = None,
                randomize_noise: bool = False) -> dict:
        mapping_results = self.mapping(z, label)
        w = mapping_results['w']

        if self.training and w_moving_decay is not None and w_moving_decay < 1:
            # GenForce's batch mean, all-gathered over the processes of a distributed trainer (which sets
            # batch_w_mean); the buffer never joins the graph.
            with torch.no_grad():
                w_avg = self.truncation.w_avg
                w_avg.copy_(w_avg * w_moving_decay + self.batch_w_mean(w.detach()) * (1 - w_moving_decay))

        if self.training and style_mixing_prob is not None and style_mixing_prob > 0:
            new_z = torch.randn_like(z)
            new_w = self.mapping(new_z, label)['w']
            current_lod = scalar_buffer(self.synthesis, 'lod') if lod is None else lod
            active_layers = self.num_layers - int(current_lod) * 2
            if np.random.uniform() < style_mixing_prob:
                cutoff = np.random.randint(1, active_layers)
                w = self.truncation(w)
                new_wp = self.truncation(new_w)
                w[:, cutoff:] = new_wp[:, cutoff:]

        wp = self.truncation(w, trunc_psi, trunc_layers)
        synthesis_results = self.synthesis(wp, lod, randomize_noise)
        return {**mapping_results, **synthesis_results}
