"""Model ``forward``s take no ``**kwargs`` catch-all: a typo'd keyword raises TypeError instead of being ignored
(``G(z, label, truncation_psi=0.7)`` used to return untruncated images)."""
import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

from ohlora.constants import LABEL_SIZE
from ohlora.layout import CODE_ROOT
from stylegan.stylegan_discriminator import StyleGANDiscriminator as GenForceD
from stylegan.stylegan_generator import StyleGANGenerator as GenForceG
from stylegan_modified.stylegan_discriminator import DISCRIMINATOR_CLASSES
from stylegan_modified.stylegan_generator import GENERATOR_CLASSES

MODEL_PACKAGES = ('cnn', 'segmentation', 'stylegan', 'stylegan_modified')
TINY_G = dict(resolution=8, z_space_dim=8, w_space_dim=8, mapping_layers=2, mapping_fmaps=8, fmaps_base=32,
              fmaps_max=8)
TINY_D = dict(resolution=8, fmaps_base=32, fmaps_max=8)


def project_modules():
    for package in MODEL_PACKAGES:
        for info in pkgutil.iter_modules([str(CODE_ROOT / package)]):
            yield importlib.import_module(f'{package}.{info.name}')


def project_model_classes() -> list[type]:
    classes = {}
    for module in project_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__ and 'forward' in vars(cls):
                classes[f'{cls.__module__}.{cls.__qualname__}'] = cls
    return [classes[name] for name in sorted(classes)]


def test_no_forward_of_the_project_takes_a_keyword_catch_all():
    classes = project_model_classes()
    assert len(classes) >= 25  # every layer and model of the four packages, not just a few
    catch_all = [f'{cls.__module__}.{cls.__qualname__}' for cls in classes
                 if any(p.kind is inspect.Parameter.VAR_KEYWORD
                        for p in inspect.signature(cls.forward).parameters.values())]
    assert not catch_all


def tiny_models():
    torch.manual_seed(0)
    z, image = torch.randn(2, 8), torch.rand(2, 3, 8, 8) * 2 - 1
    yield 'genforce G', GenForceG(**TINY_G).eval(), (z,)
    yield 'genforce D', GenForceD(**TINY_D).eval(), (image,)
    for variant, cls in GENERATOR_CLASSES.items():
        yield f'{variant} G', cls(**TINY_G).eval(), (z, torch.zeros(2, cls.LABEL_SIZE))
    for variant, cls in DISCRIMINATOR_CLASSES.items():
        yield f'{variant} D', cls(**TINY_D).eval(), (image, torch.zeros(2, cls.LABEL_SIZE))


@pytest.mark.parametrize('typo', [{'truncation_psi': 0.7}, {'trunc_psy': 0.7}, {'labels': None}])
def test_a_typod_keyword_raises_type_error(typo):
    for name, model, args in tiny_models():
        with torch.no_grad():
            model(*args)  # the right call works
            with pytest.raises(TypeError, match='unexpected keyword argument'):
                model(*args, **typo)


def test_the_generators_keywords_still_work():
    """trunc_psi and friends are real parameters: truncation changes the images of a conditional generator."""
    torch.manual_seed(0)
    generator = GENERATOR_CLASSES['v3'](**TINY_G).eval()
    with torch.no_grad():
        generator.truncation.w_avg.normal_()
        z, label = torch.randn(2, 8), torch.zeros(2, LABEL_SIZE)
        plain = generator(z, label, trunc_psi=1.0, trunc_layers=0)['image']
        truncated = generator(z, label, trunc_psi=0.7, trunc_layers=8)['image']
    assert not torch.allclose(plain, truncated)
