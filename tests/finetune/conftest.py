"""Fixtures for the fine-tuning tests: the real T5 tokenizer, the real SNI subset, a tiny saved model."""

import pytest
import torch

from t5forge.data.instructions import load_sni
from t5forge.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def t5_tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


@pytest.fixture(scope="session")
def sni_dir(data_dir):
    return data_dir / "sni"


@pytest.fixture(scope="session")
def sni_train(sni_dir, t5_tokenizer):
    """20 real SNI training examples (5 per task), prompts cut to 256 tokens (all distinct)."""
    return load_sni(sni_dir, "train", t5_tokenizer, max_num_instances_per_task=5, max_source_length=256,
                    max_target_length=32, seed=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, t5_tokenizer):
    """A fresh `tiny` T5 saved as a t5forge model directory with the real T5 tokenizer."""
    from t5forge.model.config import T5Config
    from t5forge.model.load import save_model_dir
    from t5forge.model.t5 import T5

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_model")
    save_model_dir(T5(T5Config.from_name("tiny")), t5_tokenizer, directory)
    return directory


@pytest.fixture
def cli_log_handlers():
    """Drop the logging handlers a CLI call added to the `t5forge` logger during the test: one made
    while capsys holds sys.stderr would otherwise write to that closed stream in later tests."""
    import logging

    logger = logging.getLogger("t5forge")
    before = list(logger.handlers)
    yield
    for handler in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(handler)
