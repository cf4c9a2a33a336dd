"""T5Config: HF config.json in and out, built-in architectures, rejection of non-T5 configs."""

import dataclasses
import json

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model import components
from t5forge.model.config import HF_CONFIG_KEYS, KNOWN_NAMES, T5Config
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


# ---------------------------------------------------------------------------------------------------
# Field types come from the dataclass; t5forge's model_config.json keeps every field, HF's config.json
# only HF's keys.

# A model_config.json exactly as t5forge wrote it before T5Config named its components
# (HF's keys plus attention_backend): it must keep loading, the later fields at their defaults.
SAVED_BEFORE_COMPONENTS = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": 32128, "d_model": 64,
    "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "is_encoder_decoder": True,
    "initializer_factor": 1.0, "use_cache": True, "attention_backend": "eager",
}


def test_model_config_saved_before_new_fields_loads(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(SAVED_BEFORE_COMPONENTS))
    c = T5Config.from_json_file(path)
    assert c == T5Config.from_name("tiny", dropout_rate=0.0, attention_backend="eager")
    assert (c.feed_forward, c.position, c.block, c.encoder) == ("dense", "t5_bias", "pre_norm", "stack")


def test_model_config_json_keeps_the_t5forge_fields(tmp_path, monkeypatch):
    names = dict(position="alibi", block="post_norm", encoder="hierarchical")
    for kind, name in names.items():  # not written yet: registered here under T5's own classes
        monkeypatch.setitem(components.REGISTRIES[kind], name, components.component(kind, components.HF_T5[kind]))
    hourglass = dict(hourglass_factor=4, hourglass_pre=0, hourglass_post=2)
    rope = dict(rope_theta=500.0)
    moe = dict(num_experts=4, expert_top_k=2, expert_capacity_factor=2.0, moe_every=1, router_aux_loss_coef=0.1,
               router_z_loss_coef=0.0)
    c = T5Config.from_name("tiny", attention_backend="eager", feed_forward="squared_relu", **names, **hourglass, **rope,
                             **moe)
    d = c.to_json_dict()
    assert {k: d[k] for k in T5Config.t5forge_only_fields()} == dict(
        attention_backend="eager", feed_forward="squared_relu", **names, **hourglass, **rope, **moe)
    (tmp_path / "model_config.json").write_text(json.dumps(d))
    assert T5Config.from_json_file(tmp_path / "model_config.json") == c
    # HF's config.json never carries them, and reading one ignores such keys
    assert not set(T5Config.t5forge_only_fields()) & set(c.to_hf_dict())
    assert T5Config.from_hf_dict(d) == T5Config.from_name("tiny")


@dataclasses.dataclass(frozen=True)
class WiderConfig(T5Config):
    """T5Config with fields of every JSON type added after the files below were written."""

    qk_norm: bool = False
    norm: str = "rms"
    window: int | None = None
    z_loss: float = 0.0
    drop_heads: tuple[int, ...] = ()


def test_fields_of_any_type_added_later_round_trip_and_default(tmp_path):
    c = WiderConfig.from_name("tiny", qk_norm=True, norm="layer", window=64, z_loss=1, drop_heads=(0, 3))
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(c.to_json_dict()))
    loaded = WiderConfig.from_json_file(path)
    assert loaded == c and loaded.z_loss == 1.0 and isinstance(loaded.z_loss, float)
    assert loaded.drop_heads == (0, 3)
    # a file written before the fields existed loads with their defaults
    path.write_text(json.dumps(SAVED_BEFORE_COMPONENTS))
    assert WiderConfig.from_json_file(path) == WiderConfig.from_name("tiny", dropout_rate=0.0,
                                                                     attention_backend="eager")
    # HF's config.json holds none of them
    assert not {"qk_norm", "norm", "window", "z_loss", "drop_heads"} & set(c.to_hf_dict())


@pytest.mark.parametrize(
    "key, value",
    [("qk_norm", "yes"), ("qk_norm", 1), ("norm", 3), ("window", "64"), ("window", True), ("z_loss", "0.1"),
     ("drop_heads", [0, "1"]), ("position", None), ("tie_word_embeddings", 0), ("dropout_rate", False)],
)
def test_a_wrong_typed_value_names_the_file_and_key(tmp_path, key, value):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({**WiderConfig.from_name("tiny").to_json_dict(), key: value}))
    with pytest.raises(T5ForgeError, match=rf"model_config\.json: key '{key}' has value .* of the wrong type"):
        WiderConfig.from_json_file(path)


def test_hf_config_json_holds_only_keys_transformers_t5_knows():
    import inspect

    import transformers.models.t5.modeling_t5 as modeling_t5

    hf_defaults = transformers.T5Config()  # built without our keys: what it has, it defines itself
    modeling = inspect.getsource(modeling_t5)
    d = T5Config.from_name("tiny").to_hf_dict()
    for key in d:
        # decoder_start_token_id is no T5Config field in transformers 5, but its T5 reads it from the config
        assert hasattr(hf_defaults, key) or f"config.{key}" in modeling, key
    assert set(d) == set(HF_CONFIG_KEYS) | {"architectures", "model_type", "is_encoder_decoder",
                                            "initializer_factor", "use_cache"}
    assert not set(T5Config.t5forge_only_fields()) & set(d)
    assert {"attention_backend", "feed_forward", "position", "block", "encoder"} <= set(T5Config.t5forge_only_fields())
