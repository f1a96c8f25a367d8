"""Test-wide settings (never download, deterministic single-threaded CPU maths) and the fixtures several test
files share. Reference data lives in tests/data (see its README.md); nothing outside the repository is read."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ['OHLORA_NO_DOWNLOAD'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'
torch.set_num_threads(1)  # the GenForce references were computed with 1 thread

DATA = Path(__file__).resolve().parent / 'data'


def load_tensors(path: Path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    """tests/data: the reference folders genforce/, facexformer/ and ohlora/ (a missing file fails its test)."""
    if not DATA.is_dir():
        pytest.fail(f'reference data not found at {DATA}; it is part of the repository')
    return DATA


@pytest.fixture(scope='session')
def tiny_ckpt(reference_dir) -> Path:
    """The tiny GenForce zoo checkpoint (real topology, tiny widths)."""
    return reference_dir / 'genforce' / 'tiny_ckpt.pth'


@pytest.fixture(scope='session')
def genforce(reference_dir, tiny_ckpt):
    """The tiny GenForce zoo checkpoint, its tiny_config.json and GenForce's outputs on it (tiny_ref.pt)."""
    folder = reference_dir / 'genforce'
    config = json.loads((folder / 'tiny_config.json').read_text())
    return tiny_ckpt, config, load_tensors(folder / 'tiny_ref.pt')


@pytest.fixture(scope='session')
def facexformer_dir(reference_dir) -> Path:
    return reference_dir / 'facexformer'


@pytest.fixture(scope='session')
def synthetic_facexformer(tmp_path_factory) -> Path:
    """A FaceXFormer checkpoint of the official layout with synthetic weights (369 MB, written once per session;
    tests only read it)."""
    from segmentation.facexformer_synthetic import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp('facexformer') / 'model.pt'
    write_synthetic_checkpoint(path)
    yield path
    path.unlink()


@pytest.fixture(scope='session')
def facexformer_ref(facexformer_dir):
    """ref_outputs.pt plus what the trimmed file stores in a derived form:

    * ``input``: the reference batch (drawn face, astronaut crop) normalised again; the file keeps only its
      SHA-256, which the stage-3 crop test checks;
    * ``parsing_clear``: [2, 224, 224] bool, the pixels whose top-2 logit gap exceeds 1e-4 (there the argmax
      must agree; the file lists the near ties).
    """
    from segmentation.face_input import normalize

    ref = load_tensors(facexformer_dir / 'ref_outputs.pt')
    ref['input'] = normalize(torch.stack([ref['drawn_face_uint8'], ref['crop_resized_uint8']]).numpy())
    clear = torch.ones(ref['parsing'].shape, dtype=torch.bool)
    clear[tuple(ref['parsing_near_ties'].T)] = False
    ref['parsing_clear'] = clear
    return ref


@pytest.fixture(scope='session')
def property_scores_dir(reference_dir) -> Path:
    """The 37 drawn stage-4 cases (fixtures/) and the upstream's scores of them."""
    return reference_dir / 'ohlora' / 'property_scores'


@pytest.fixture(scope='session')
def cond_stylegan_tiny(reference_dir):
    """Tiny conditional StyleGAN state_dicts (v1 G, v3 G, v1 D), their inputs and the upstream's outputs."""
    return load_tensors(reference_dir / 'ohlora' / 'cond_stylegan_tiny.pt')
