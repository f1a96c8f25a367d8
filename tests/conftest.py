"""Test-wide settings: never download, deterministic single-threaded CPU maths, paths to shared/reference."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ['OHLORA_NO_DOWNLOAD'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'
torch.set_num_threads(1)  # the GenForce references were computed with 1 thread

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('OHLORA_SHARED', REPO.parent / 'shared'))
REFERENCE = SHARED / 'reference'


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f'reference data not found at {REFERENCE}; put shared/ beside the checkout or set OHLORA_SHARED')
    return REFERENCE


@pytest.fixture(scope='session')
def genforce(reference_dir):
    """The tiny GenForce zoo checkpoint, its tiny_config.json and GenForce's outputs on it (tiny_ref.pt)."""
    folder = reference_dir / 'genforce'
    config = json.loads((folder / 'tiny_config.json').read_text())
    ref = torch.load(folder / 'tiny_ref.pt', map_location='cpu', weights_only=True)
    return folder / 'tiny_ckpt.pth', config, ref
