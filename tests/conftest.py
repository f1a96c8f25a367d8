"""Test-wide settings: never download, deterministic single-threaded CPU maths, paths to shared/reference."""
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
