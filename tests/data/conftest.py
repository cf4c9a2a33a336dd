"""Fixtures for the data tests: the real T5 tokenizer (ours and transformers'), real C4 documents."""

import gzip
import json
import shutil

import pytest


@pytest.fixture(scope="session")
def c4_train_file(data_dir):
    return data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz"


@pytest.fixture(scope="session")
def c4_valid_file(data_dir):
    return data_dir / "c4-sample" / "c4-en.olmo-sample-1000.json.gz"


@pytest.fixture(scope="session")
def c4_docs(c4_train_file):
    with gzip.open(c4_train_file, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def t5_tokenizer(spiece_path):
    from t5forge.tokenizer import load_tokenizer

    return load_tokenizer(spiece_path)


@pytest.fixture(scope="session")
def hf_t5_tokenizer(spiece_path, tmp_path_factory):
    """transformers' T5 tokenizer from the real spiece.model (from_pretrained needs a folder)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_t5_vocab")
    shutil.copy(spiece_path, folder / "spiece.model")
    return transformers.T5Tokenizer.from_pretrained(str(folder))
