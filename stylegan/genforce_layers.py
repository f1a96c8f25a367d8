"""Building blocks shared by GenForce's StyleGAN generator and discriminator.

Every weight is stored *raw* and multiplied at run time by a constant computed in double precision
(``gain / sqrt(fan_in) * lr_mul``, the "equalised learning rate"). The product is taken in the same
order as GenForce (scale times weight, before the matmul or conv), because dividing instead, or scaling
the output, rounds differently and the reference outputs are matched bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
WSCALE_GAIN = math.sqrt(2.0)
FUSED_SCALE_MIN_RES = 128  # fused_scale='auto' fuses up/down-sampling into the conv from this resolution on
INIT_RES = 4


def channels_at(res: int, fmaps_base: int, fmaps_max: int) -> int:
    """GenForce's ``get_nf``: the number of feature maps at resolution ``res``."""
    return min(fmaps_base // res, fmaps_max)


def resolve_fused_scale(fused_scale, res: int) -> bool:
    if fused_scale == 'auto':
        return res >= FUSED_SCALE_MIN_RES
    if isinstance(fused_scale, bool):
        return fused_scale
    raise ValueError(f"fused_scale must be True, False or 'auto', not {fused_scale!r}")


def check_resolution(resolution: int) -> int:
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f'resolution must be a power of two >= 8, not {resolution!r}')
    return int(math.log2(resolution))


def runtime_scale(fan_in: int, gain: float, lr_mul: float, use_wscale: bool) -> tuple[float, float]:
    """(runtime weight multiplier, std of the initial weight), as in StyleGAN's equalised learning rate."""
    he_std = gain / math.sqrt(fan_in)
    if use_wscale:
        return he_std * lr_mul, 1.0 / lr_mul
    return lr_mul, he_std / lr_mul


def scalar_buffer(module: nn.Module, name: str) -> float:
    """The one-element buffer ``module.<name>`` (the ``lod``) as a Python float, read from its device once per value.

    The lod is read in every forward to pick the layers, and ``.item()`` on a CUDA tensor waits for all queued GPU
    work: several stalls per training step for a value that never changes while training. The value is kept with
    the tensor and its version counter, so an in-place change (``fill_``, ``load_state_dict``) or a new tensor
    (``.to(device)``) is read again; the result is the same float ``.item()`` gives."""
    tensor = getattr(module, name)
    try:
        version = tensor._version
    except RuntimeError:  # a tensor made under inference_mode keeps no version: read it every time
        return tensor.item()
    cache = module.__dict__.setdefault('_scalar_buffer_cache', {})
    entry = cache.get(name)
    if entry is None or entry[0] is not tensor or entry[1] != version:
        entry = cache[name] = (tensor, version, tensor.item())
    return entry[2]


def blur_kernel(channels: int) -> torch.Tensor:
    """[1,2,1]^T [1,2,1] / 16, one copy per channel, shaped for a depthwise conv."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float32)
    kernel = torch.outer(taps, taps)
    kernel = kernel / kernel.sum()
    return kernel.reshape(1, 1, 3, 3).repeat(channels, 1, 1, 1)


class _DepthwiseBlur(torch.autograd.Function):
    """The blur as its own autograd function, as GenForce writes it: its gradient is the same blur with the kernel
    flipped, itself differentiable. PyTorch's generic double backward of a depthwise conv (R1 differentiates D's
    input gradient) is the slowest kernel of a v1 training step on a GPU; this path gives the same values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        return F.conv2d(x, kernel, stride=1, padding=1, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernel, = ctx.saved_tensors
        return _DepthwiseBlur.apply(grad, kernel.flip(-2, -1).to(grad.dtype)), None  # AMP: grad may be bf16/fp16


class BlurLayer(nn.Module):
    """Depthwise 3x3 binomial blur; the kernel is a checkpoint buffer (``blur.kernel``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer('kernel', blur_kernel(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: no autograd record to make
            return F.conv2d(x, self.kernel, stride=1, padding=1, groups=x.shape[1])
        return _DepthwiseBlur.apply(x, self.kernel)


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode='nearest')


def downsample_average(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2, padding=0)


def shifted_window_sum(kernel: torch.Tensor) -> torch.Tensor:
    """3x3 kernel -> 4x4: the sum of its four 1-pixel-shifted copies (zero-padded to 5x5 first).

    A stride-2 conv (or transposed conv) with this kernel equals a 3x3 conv combined with a 2x2 box
    (average-pool before / nearest-upsample after), in one pass at the lower resolution.
    """
    padded = F.pad(kernel, (1, 1, 1, 1))
    return padded[:, :, 1:, 1:] + padded[:, :, :-1, 1:] + padded[:, :, 1:, :-1] + padded[:, :, :-1, :-1]


class DenseLayer(nn.Module):
    """A fully connected layer with runtime weight scaling and an optional LeakyReLU(0.2).

    The input is flattened (NCHW order), as GenForce's DenseBlock does.
    """

    def __init__(self, in_features: int, out_features: int, *, use_wscale: bool = True,
                 gain: float = WSCALE_GAIN, lr_mul: float = 1.0, activate: bool = True):
        super().__init__()
        self.wscale, init_std = runtime_scale(in_features, gain, lr_mul, use_wscale)
        self.bscale = lr_mul
        self.activate = activate
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * init_std)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        x = F.linear(x, self.weight * self.wscale, self.bias * self.bscale)
        return F.leaky_relu(x, LRELU_SLOPE) if self.activate else x

    def extra_repr(self) -> str:
        return (f'in={self.weight.shape[1]}, out={self.weight.shape[0]}, wscale={self.wscale:.6g}, '
                f'bscale={self.bscale:g}, lrelu={self.activate}')
