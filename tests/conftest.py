"""Shared test fixtures: where the real data lives, and small-CPU settings.

The real corpora, the T5 vocabulary and the SNI subset are read from `T5FORGE_DATA`
(default: `../shared/data` next to the repository). The project never copies them.
"""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("T5FORGE_DATA", REPO.parent / "shared" / "data")).resolve()

# No test touches the network: the Hugging Face libraries (and t5forge's Hub check) stay offline.
# Tests of the offline behaviour itself unset this and point HF_ENDPOINT at a local port.
os.environ["HF_HUB_OFFLINE"] = "1"

# Two CI cores shared by two xdist workers: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"real test data not found at {DATA_DIR}; set T5FORGE_DATA to the shared data folder")
    return DATA_DIR


@pytest.fixture(scope="session")
def spiece_path(data_dir) -> Path:
    return data_dir / "t5-spiece" / "spiece.model"
