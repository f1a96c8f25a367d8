"""The Oh-LoRA conditional StyleGAN generators (MODELS.md §4, PIPELINE.md §7.1).

Each is GenForce's generator (:mod:`stylegan.stylegan_generator`) with one change in the mapping network:
the label is embedded (``label @ mapping.label_weight``, no bias, no scaling), concatenated to z, and the
pixel norm runs over the concatenation [z, embedding] before ``dense0`` (whose fan-in is therefore
512 + E, which sets its runtime weight scale). The synthesis network is GenForce's, unchanged, so the 105
``synthesis.*`` tensors of a fine-tuned file are the zoo model's.

| class | label size L | embedding E (``label_convert_dim``) | style mixing default (train mode only) |
|---|---|---|---|
| ``StyleGANGenerator`` (v1) | 7 | 16 | 0.9 |
| ``StyleGANGeneratorForV2`` | 7 | 16 | 0.0 |
| ``StyleGANGeneratorForV3`` | 7 | 24 | 0.0 |
| ``StyleGANGeneratorForV4`` | 3 | 16 | 0.0 |

``G(z, label, ...)`` returns GenForce's dict plus ``'embedding'``: ``z`` (the normalised concatenation),
``label``, ``w``, ``embedding``, ``wp``, ``style00`` … ``style13``, ``image``. Labels and z of another float
dtype (float64 from a CSV, R12) are cast to the weights' dtype.
"""
from __future__ import annotations

import torch

from ohlora import constants
from stylegan.stylegan_generator import MappingModule
from stylegan.stylegan_generator import StyleGANGenerator as GenForceStyleGANGenerator

__all__ = ['ConditionalMappingModule', 'ConditionalStyleGANGenerator', 'StyleGANGenerator', 'StyleGANGeneratorForV2',
           'StyleGANGeneratorForV3', 'StyleGANGeneratorForV4', 'GENERATOR_CLASSES']

_CLASS_DEFAULT = object()  # "the style-mixing probability of this class" (None keeps GenForce's meaning: off)


class ConditionalMappingModule(MappingModule):
    """GenForce's mapping with a label of width ``label_size`` embedded to ``embedding_dim``; the label is required."""

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        if label is None:
            raise ValueError(f'the conditional generator needs a label [N, {self.label_size}]')
        dtype = self.label_weight.dtype
        # Labels read from CSVs arrive as float64 (upstream issue 2-1): cast instead of failing in the matmul.
        label = torch.as_tensor(label).to(device=self.label_weight.device, dtype=dtype)
        return super().forward(z.to(dtype), label)


class ConditionalStyleGANGenerator(GenForceStyleGANGenerator):
    """Shared body of the Oh-LoRA generators: GenForce's constructor keywords plus ``label_convert_dim``."""

    LABEL_SIZE = constants.LABEL_SIZE
    LABEL_CONVERT_DIM = 16
    STYLE_MIXING_PROB = 0.0

    def __init__(self, resolution: int = 256, z_space_dim: int = 512, w_space_dim: int = 512,
                 label_size: int | None = None, mapping_layers: int = 8, mapping_fmaps: int = 512,
                 mapping_lr_mul: float = 0.01, repeat_w: bool = True, image_channels: int = 3,
                 final_tanh: bool = False, const_input: bool = True, fused_scale='auto', use_wscale: bool = True,
                 noise_type: str = 'spatial', fmaps_base: int = 16 << 10, fmaps_max: int = 512,
                 label_convert_dim: int | None = None):
        label_size = self.LABEL_SIZE if label_size is None else label_size
        label_convert_dim = self.LABEL_CONVERT_DIM if label_convert_dim is None else label_convert_dim
        if label_size < 1 or label_convert_dim < 1:
            raise ValueError(f'label_size and label_convert_dim must be >= 1, got {label_size}, {label_convert_dim}')
        # GenForce's unconditional generator, then its mapping is swapped for the conditional one (the module
        # keeps its place, so the state_dict order stays mapping, truncation, synthesis).
        super().__init__(resolution, z_space_dim=z_space_dim, w_space_dim=w_space_dim, label_size=0,
                         mapping_layers=mapping_layers, mapping_fmaps=mapping_fmaps, mapping_lr_mul=mapping_lr_mul,
                         repeat_w=repeat_w, image_channels=image_channels, final_tanh=final_tanh,
                         const_input=const_input, fused_scale=fused_scale, use_wscale=use_wscale,
                         noise_type=noise_type, fmaps_base=fmaps_base, fmaps_max=fmaps_max)
        self.label_size = label_size
        self.label_convert_dim = label_convert_dim
        self.config.update(label_size=label_size, label_convert_dim=label_convert_dim)
        self.mapping = ConditionalMappingModule(
            input_space_dim=z_space_dim, hidden_space_dim=mapping_fmaps,
            final_space_dim=w_space_dim if repeat_w else w_space_dim * self.num_layers, label_size=label_size,
            num_layers=mapping_layers, use_wscale=use_wscale, lr_mul=mapping_lr_mul, embedding_dim=label_convert_dim)

    def forward(self, z: torch.Tensor, label: torch.Tensor, lod: float | None = None,
                w_moving_decay: float | None = 0.995, style_mixing_prob=_CLASS_DEFAULT,
                trunc_psi: float | None = None, trunc_layers: int | None = None,
                randomize_noise: bool = False) -> dict:
        if style_mixing_prob is _CLASS_DEFAULT:
            style_mixing_prob = self.STYLE_MIXING_PROB
        return super().forward(z, label, lod=lod, w_moving_decay=w_moving_decay,
                               style_mixing_prob=style_mixing_prob, trunc_psi=trunc_psi, trunc_layers=trunc_layers,
                               randomize_noise=randomize_noise)


class StyleGANGenerator(ConditionalStyleGANGenerator):
    """v1 (``stylegan_gen_fine_tuned_v1.pth``): 7 labels, embedding 16; mixes styles (p 0.9) in train mode."""
    LABEL_SIZE, LABEL_CONVERT_DIM, STYLE_MIXING_PROB = constants.LABEL_SIZE, 16, 0.9


class StyleGANGeneratorForV2(ConditionalStyleGANGenerator):
    """v2 (not published): the v1 layout, no style mixing."""
    LABEL_SIZE, LABEL_CONVERT_DIM, STYLE_MIXING_PROB = constants.LABEL_SIZE, 16, 0.0


class StyleGANGeneratorForV3(ConditionalStyleGANGenerator):
    """v3 (``stylegan_gen_fine_tuned_v3_ckpt_0005_gen.pth``, the one in use): 7 labels, embedding 24."""
    LABEL_SIZE, LABEL_CONVERT_DIM, STYLE_MIXING_PROB = constants.LABEL_SIZE, 24, 0.0


class StyleGANGeneratorForV4(ConditionalStyleGANGenerator):
    """v4 (``stylegan_gen_fine_tuned_v4.pth``): 3 labels [eyes, mouth, pose], embedding 16."""
    LABEL_SIZE, LABEL_CONVERT_DIM, STYLE_MIXING_PROB = 3, 16, 0.0


GENERATOR_CLASSES = {'v1': StyleGANGenerator, 'v2': StyleGANGeneratorForV2, 'v3': StyleGANGeneratorForV3,
                     'v4': StyleGANGeneratorForV4}
