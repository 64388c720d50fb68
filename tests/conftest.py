import sys
from pathlib import Path

import pytest

# test helpers (naive_reference, planted, realdata...) live beside the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def lesion_model():
    """A tiny model trained in this session to find a planted bright lesion (see planted.py)."""
    from planted import train_lesion_model

    # patch 4x8x8 on 16x64x64 scans: a 4x8x8 token grid, fine enough to say where the lesion is
    return train_lesion_model(steps=160, batch=16, config="tiny_multiscan_h2", vision={"patch_size": [4, 8, 8], "img_size": [16, 64, 64]})


@pytest.fixture(scope="session")
def held_out():
    """48 studies never seen in training (training draws from seed 1000)."""
    from planted import make_studies

    return make_studies(48, seed=12345)
