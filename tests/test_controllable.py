"""The generator interface shared by stage 6, the evaluation and the attribute directions."""
import pytest
import torch

from stylegan_modified.controllable import ConditionalControl, ControllableGenerator
from stylegan_modified.stylegan_generator import StyleGANGenerator, StyleGANGeneratorForV3

TINY = dict(resolution=16, z_space_dim=8, w_space_dim=8, mapping_layers=2, mapping_fmaps=8, fmaps_base=64, fmaps_max=8)


def test_conditional_control_is_the_eval_mode_label_call():
    torch.manual_seed(0)
    generator = StyleGANGenerator(**TINY).train()  # v1 mixes styles in train mode; the adapter must switch it off
    control = ConditionalControl(generator, 'v1')
    assert isinstance(control, ControllableGenerator)
    assert (control.name, control.z_dim, control.score_algorithm) == ('v1', 8, 1)
    assert not generator.training
    z, label = torch.randn(3, 8), torch.randn(3, 7)
    first, second = control.images(z, label), control.images(z, label)
    assert torch.equal(first, second)  # a function of (z, label): no mixing, stored noise
    expected = generator(z, label, trunc_psi=1.0, trunc_layers=0, randomize_noise=False)['image']
    assert torch.equal(first, expected)
    assert not torch.equal(first, control.images(z, label + 1.0))  # the label reaches the image


def test_v3_controls_three_attributes_in_the_algorithm_2_space():
    control = ConditionalControl(StyleGANGeneratorForV3(**TINY), 'v3')
    assert control.trained_attributes == ('eyes', 'mouth', 'pose') and control.score_algorithm == 2
    with pytest.raises(ValueError, match='unknown conditional variant'):
        ConditionalControl(StyleGANGeneratorForV3(**TINY), 'v9')
