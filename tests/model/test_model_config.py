"""T5Config: HF config.json in and out, built-in architectures, rejection of non-T5 configs."""

import json

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import KNOWN_NAMES, T5Config
from t5forge.model.t5 import T5

transformers = pytest.importorskip("transformers")


def test_defaults_follow_the_contract():
    c = T5Config()
    assert (c.vocab_size, c.d_model, c.num_layers, c.num_decoder_layers, c.feed_forward_proj) == (
        32128, 768, 12, 12, "gated-gelu")
    assert c.attention_backend == "sdpa" and not c.tie_word_embeddings
    assert T5Config(num_layers=3).num_decoder_layers == 3
    assert T5Config(num_layers=3, num_decoder_layers=5).num_decoder_layers == 5


def test_to_hf_dict_is_accepted_by_transformers_and_round_trips():
    c = T5Config.from_name("tiny", num_decoder_layers=3, feed_forward_proj="gated-silu")
    d = c.to_hf_dict()
    assert d["architectures"] == ["T5ForConditionalGeneration"] and d["model_type"] == "t5"
    hf = transformers.T5Config(**d)
    assert (hf.d_model, hf.num_decoder_layers, hf.dense_act_fn, hf.is_gated_act) == (64, 3, "silu", True)
    assert T5Config.from_hf_dict(json.loads(json.dumps(d))) == c.replace(attention_backend="sdpa")


def test_from_hf_dict_reads_transformers_5_untied_convention():
    # transformers >= 5 writes tie_word_embeddings=true for every T5 and keeps v1.1's "own lm_head,
    # no output rescale" in scale_decoder_outputs.
    hf = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, tie_word_embeddings=False)
    d = hf.to_dict()
    assert d["tie_word_embeddings"] is True and d["scale_decoder_outputs"] is False
    assert T5Config.from_hf_dict(d).tie_word_embeddings is False
    # Original T5 configs omit the key altogether: HF's default, tied.
    legacy = {"model_type": "t5", "d_model": 512, "num_heads": 8, "num_layers": 6, "feed_forward_proj": "relu"}
    assert T5Config.from_hf_dict(legacy).tie_word_embeddings is True


@pytest.mark.parametrize("name", KNOWN_NAMES)
def test_builtin_architectures(name):
    c = T5Config.from_name(name)
    assert c.num_decoder_layers == c.num_layers
    if name == "tiny":
        assert (c.d_model, c.d_ff, c.num_heads, c.d_kv, c.num_layers) == (64, 128, 4, 16, 2)
        model = T5(c)
        assert model.num_parameters() > 0


def test_known_parameter_counts():
    # Public numbers: t5-small 60.5M (tied), t5-v1_1-small 76.96M (untied)
    with torch.device("meta"):
        assert T5(T5Config.from_name("t5-small")).num_parameters() == 60_506_624
        assert T5(T5Config.from_name("google/t5-v1_1-small")).num_parameters() == 76_961_152


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "bart"}, "model_type is 'bart'"),
        ({"model_type": None}, "model_type is None"),
        ({"feed_forward_proj": "gated-swish"}, "feed_forward_proj 'gated-swish' is unknown"),
        ({"d_model": "512"}, "key 'd_model'"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"eos_token_id": [1, 2]}, "eos_token_id"),
    ],
)
def test_from_hf_dict_rejects_non_t5_configs(patch, message):
    d = {**T5Config.from_name("tiny").to_hf_dict(), **patch}
    with pytest.raises(T5ForgeError, match=message) as err:
        T5Config.from_hf_dict(d, source="some/dir/config.json")
    assert "some/dir/config.json" in str(err.value)


def test_unknown_names_and_fields_are_errors(tmp_path):
    with pytest.raises(T5ForgeError, match="unknown model name 'google/t5-xxl'"):
        T5Config.from_name("google/t5-xxl")
    with pytest.raises(T5ForgeError, match="unknown field"):
        T5Config.from_name("tiny", n_layer=3)
    with pytest.raises(T5ForgeError, match="attention_backend 'flash'"):
        T5Config(attention_backend="flash")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(T5ForgeError, match="not valid JSON"):
        T5Config.from_json_file(bad)
