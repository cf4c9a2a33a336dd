"""Fixtures for the fine-tuning data tests: the real T5 tokenizer and the real SNI subset."""

import pytest

from t5forge.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def t5_tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


@pytest.fixture(scope="session")
def sni_dir(data_dir):
    return data_dir / "sni"
