"""Device choice and reproducibility switches."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/``'auto'``: cuda if available, else cpu. An unavailable cuda is an error, not a silent fallback."""
    from ohlora.errors import PipelineError

    if name in (None, '', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PipelineError(f'--device {name!r} is not a device torch knows ({exc})') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise PipelineError(f'--device {name} was asked for, but torch sees no CUDA device here; use --device cpu')
    return device


def disable_tf32() -> None:
    """TF32 matmuls move GAN outputs by ~1e-3; the reference comparisons and seeded outputs want full float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions (CUDA, Ampere and newer) while the block runs when ``enabled``, off when not;
    the previous setting afterwards. The trainers' ``--tf32``: about twice as fast in float32 training on such GPUs,
    at a precision of ~1e-3 (TF32's 10-bit mantissa), so off by default (:func:`disable_tf32`). No effect on CPU."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def mixed_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 64-bit number that depends only on (seed, index, stream), for any ints (negative or huge seeds too)."""
    # SplitMix64-style mixing keeps nearby (seed, index) pairs far apart in the seed space.
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) \
        & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x


def item_generator(seed: int, index: int, stream: int = 0, device='cpu') -> torch.Generator:
    """An RNG whose draws depend only on (seed, index, stream), never on batch size or run order (R1)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed_seed(seed, index, stream) & (2**63 - 1))
    return gen


def library_seed(seed: int, stream: int) -> int:
    """A seed in [0, 2**32) for numpy's ``default_rng`` and scikit-learn's ``random_state`` (which refuse negative
    or larger ones), derived from any project ``--seed`` and a stream number, so every int seed works."""
    return mixed_seed(seed, 0, stream) & (2**32 - 1)
