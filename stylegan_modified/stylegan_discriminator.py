"""The Oh-LoRA conditional StyleGAN discriminators (MODELS.md §4, PIPELINE.md §7.1).

GenForce's discriminator (:mod:`stylegan.stylegan_discriminator`) with its last layer replaced: instead of
GenForce's projection ``sum(layer14(x) * label)``, the raw label is concatenated to the output of ``layer13``
and ``layer14`` is a linear dense layer (512 + L) -> 1 with gain 1 (runtime scale 1/sqrt(512 + L)). The
minibatch-stddev group is min(16, N) (upstream's training batch size; GenForce uses 4). It has no tensor, so
only the forward pass depends on it.

``D(image, label)``: image RGB in [-1, 1] [N, 3, 256, 256], label [N, L] (cast to float32) -> logits [N, 1].
"""
from __future__ import annotations

import torch

from ohlora import constants
from stylegan.genforce_layers import DenseLayer
from stylegan.stylegan_discriminator import StyleGANDiscriminator as GenForceStyleGANDiscriminator

__all__ = ['StyleGANDiscriminator', 'StyleGANDiscriminatorForV4', 'DISCRIMINATOR_CLASSES']

MINIBATCH_STD_GROUP_SIZE = 16


class StyleGANDiscriminator(GenForceStyleGANDiscriminator):
    """v1 (``stylegan_dis_fine_tuned_v1.pth``): 7 labels, ``layer14.weight`` [1, 519] at full width."""

    LABEL_SIZE = constants.LABEL_SIZE

    def __init__(self, resolution: int = 256, image_channels: int = 3, label_size: int | None = None,
                 fused_scale='auto', use_wscale: bool = True,
                 minibatch_std_group_size: int = MINIBATCH_STD_GROUP_SIZE, minibatch_std_channels: int = 1,
                 fmaps_base: int = 16 << 10, fmaps_max: int = 512):
        label_size = self.LABEL_SIZE if label_size is None else label_size
        if label_size < 1:
            raise ValueError(f'label_size must be >= 1, got {label_size}')
        super().__init__(resolution, image_channels=image_channels, label_size=0, fused_scale=fused_scale,
                         use_wscale=use_wscale, minibatch_std_group_size=minibatch_std_group_size,
                         minibatch_std_channels=minibatch_std_channels, fmaps_base=fmaps_base, fmaps_max=fmaps_max)
        self.label_size = label_size
        self.config['label_size'] = label_size
        features = getattr(self, self.final_layer_name).weight.shape[1]
        # Replaces GenForce's head in place, so layer14 stays the last entry of the state_dict.
        setattr(self, self.final_layer_name, DenseLayer(features + label_size, 1, use_wscale=use_wscale, gain=1.0,
                                                        activate=False))

    def forward(self, image: torch.Tensor, label: torch.Tensor, lod: float | None = None) -> torch.Tensor:
        if label is None or tuple(label.shape) != (image.shape[0], self.label_size):
            got = None if label is None else list(label.shape)
            raise ValueError(f'label must have shape [{image.shape[0]}, {self.label_size}], got {got}')
        features = self.features(image, lod)
        label = torch.as_tensor(label).to(device=features.device, dtype=features.dtype)
        return getattr(self, self.final_layer_name)(torch.cat((features, label), dim=1))


class StyleGANDiscriminatorForV4(StyleGANDiscriminator):
    """v4 (``stylegan_dis_fine_tuned_v4.pth``): 3 labels [eyes, mouth, pose], ``layer14.weight`` [1, 515]."""

    LABEL_SIZE = 3


DISCRIMINATOR_CLASSES = {'v1': StyleGANDiscriminator, 'v4': StyleGANDiscriminatorForV4}
