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


@pytest.fixture(scope="session")
def c4_pretrain_args(data_dir, spiece_path):
    """c4_pretrain_args(out_dir, *extra) -> argv after `t5forge`: a pt_tiny pre-training run on the real
    C4 sample (train and held-out files) with T5's vocabulary; `extra` items come last and win."""
    c4 = data_dir / "c4-sample"

    def args(out_dir, *extra):
        return [
            "pretrain", "task=pt_tiny", f"out_dir={out_dir}", f"data.tokenizer={spiece_path}",
            f"data.train_files=[{c4 / 'c4-en.train-00000-first1000.json.gz'}]",
            f"data.validation_files=[{c4 / 'c4-en.olmo-sample-1000.json.gz'}]",
            *extra,
        ]

    return args


@pytest.fixture
def tiny_pretrain_args(c4_pretrain_args):
    """tiny_pretrain_args(out_dir, *extra) -> argv after `t5forge`: 6 steps of c4_pretrain_args, every
    hook firing (log every step, eval and checkpoint every 3)."""

    def args(out_dir, *extra):
        return c4_pretrain_args(
            out_dir, "optim.total_steps=6", "eval.every_steps=3", "eval.steps=1", "checkpoint.every_steps=3",
            "logging.every_steps=1", *extra,
        )

    return args
