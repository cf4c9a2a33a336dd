"""The checkpoint families a T5 user meets: T5 v1.0 and v1.1 (and the LM-adapted v1.1, which is
v1.1's architecture), mT5 and UMT5. Parity of logits, loss and generation with transformers' classes
runs in test_model_equivalence.py (hf_twins.CONFIGS holds an mT5 and two UMT5s); here: the round
trip HF -> t5forge -> HF through real directories, the released mT5 shape, transformers 5's tied
mT5, and what UMT5's table per layer means for the names, the converter and export."""

import json
import logging
import math

import pytest
import torch
from hf_twins import hf_classes, hf_reference, padded_batch, t5forge_config, twin

from t5forge.errors import T5ForgeError
from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.hf import export_hf, hf_parameter_shapes, hf_to_t5forge_name, t5forge_to_hf_name
from t5forge.model.load import load_model, save_model_dir
from t5forge.model.per_layer_bias import PerLayerRelativeBias
from t5forge.model.t5 import T5

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402 (after the importorskip)

# config.json keys whose values may differ after the round trip, once transformers has read both
# files: where the directory was, and the dtype transformers records on save (t5forge writes none).
CONFIG_KEYS_THAT_MAY_DIFFER = {"_name_or_path", "dtype"}
FAMILIES = {"t5 v1.0": "v1_0-relu-tied", "t5 v1.1": "v1_1-gated-gelu-untied", "mt5": "mt5", "umt5": "umt5"}


def logits(model, vocab):
    input_ids, attention_mask, labels = padded_batch(vocab)
    with torch.no_grad():
        if isinstance(model, T5):
            return model.logits(model(input_ids, attention_mask, labels=labels).hidden)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_hf_t5forge_hf_gives_identical_weights_and_config(tmp_path, family):
    config = t5forge_config(FAMILIES[family])
    hf = hf_reference(config)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, _ = load_model(tmp_path / "hf")
    assert model.config.model_type == config.model_type and model.config.position == config.position
    export_hf(model, None, tmp_path / "out")

    # the weights file: every key and every tensor
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    # the model transformers builds from each directory: its class and its whole state dict, tied aliases included
    model_class = hf_classes(config.model_type)[1]
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert type(back) is model_class
    original = hf.state_dict()
    assert set(back.state_dict()) == set(original)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # config.json as transformers reads it, up to the documented keys
    read = [transformers.AutoConfig.from_pretrained(str(tmp_path / d)).to_dict() for d in ("hf", "out")]
    differ = {k for k in set(read[0]) | set(read[1]) if read[0].get(k) != read[1].get(k)}
    assert differ <= CONFIG_KEYS_THAT_MAY_DIFFER, {k: (read[0].get(k), read[1].get(k)) for k in differ}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == config.model_type and written["architectures"] == [model_class.__name__]
    torch.testing.assert_close(logits(back, config.vocab_size), logits(hf, config.vocab_size), rtol=0, atol=0)


def test_released_mt5_config_parses_with_its_250112_rows():
    # transformers' MT5Config defaults are google/mt5-small's architecture; the released config.json says untied
    d = {**transformers.MT5Config().to_dict(), "tie_word_embeddings": False}
    config = T5Config.from_hf_dict(json.loads(json.dumps(d)))
    assert (config.model_type, config.vocab_size, config.feed_forward_proj, config.tie_word_embeddings) == (
        "mt5", 250112, "gated-gelu", False)
    assert config.replace(dropout_rate=0.0) == T5Config.from_name("google/mt5-small", dropout_rate=0.0)
    assert config.to_hf_dict()["architectures"] == ["MT5ForConditionalGeneration"]
    # the shapes: HF's MT5 for this config, built without memory, against what export expects
    with torch.device("meta"):
        hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**config.to_hf_dict()))
        ours = T5(config)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()
              if not k.endswith("embed_tokens.weight")}
    assert hf_parameter_shapes(config) == shapes
    assert shapes["shared.weight"] == shapes["lm_head.weight"] == (250112, 512)
    # HF ties lm_head to shared at init (the loaded checkpoint unties it): count its shapes instead
    assert ours.num_parameters() == sum(math.prod(shape) for shape in shapes.values()) == 300_176_768  # mT5-small's 300M


def test_transformers_5_tied_mt5_loads_as_its_function(tmp_path):
    # transformers 5 ties an MT5 built from a config and saves no lm_head; HF's MT5 never rescales,
    # so t5forge loads it untied with lm_head a copy of shared.
    config_class, model_class = hf_classes("mt5")
    torch.manual_seed(0)
    hf = model_class(config_class(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    assert hf.lm_head.weight is hf.shared.weight
    hf.save_pretrained(str(tmp_path / "hf"))
    assert "lm_head.weight" not in load_file(str(tmp_path / "hf" / "model.safetensors"))
    model, _ = load_model(tmp_path / "hf")
    assert not model.config.tie_word_embeddings and torch.equal(model.lm_head.weight, model.shared.weight)
    torch.testing.assert_close(logits(model.eval(), 99), logits(hf, 99), rtol=1e-5, atol=1e-5)


def test_mt5_cannot_be_tied():
    with pytest.raises(T5ForgeError, match="model_type 'mt5' has its own lm_head and no output rescale"):
        T5Config.from_name("tiny", model_type="mt5", tie_word_embeddings=True)
    with pytest.raises(T5ForgeError, match="model_type 'bart' is unknown"):
        T5Config.from_name("tiny", model_type="bart")


def test_lm_adapted_v1_1_is_v1_1():
    for size in ("small", "base", "large"):
        assert T5Config.from_name(f"google/t5-{size}-lm-adapt") == T5Config.from_name(f"google/t5-v1_1-{size}")


def test_umt5_keeps_a_table_per_layer_under_its_own_names():
    config = t5forge_config("umt5")
    model = T5(config)
    assert isinstance(model.encoder.position, PerLayerRelativeBias)
    assert len(model.encoder.position.layers) == 3 and len(model.decoder.position.layers) == 2
    tables = [t.weight for t in model.encoder.position.layers]
    assert not torch.equal(tables[0], tables[1])  # each drawn on its own by T5.init_weights
    assert tables[0].std().item() == pytest.approx(config.d_model ** -0.5, rel=0.3)
    hf_name = "encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight"
    assert t5forge_to_hf_name("encoder.position.layers.2.weight") == hf_name
    assert hf_to_t5forge_name(hf_name, "umt5") == "encoder.position.layers.2.weight"
    block0 = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert hf_to_t5forge_name(block0, "umt5") == "decoder.position.layers.0.weight"
    assert hf_to_t5forge_name(block0, "t5") == "decoder.position.weight"


def test_umt5_twins_keep_the_dense_bias_and_report_nothing_left_plain():
    config = t5forge_config("umt5")
    model = twin(hf_reference(config), config, "sdpa")
    _, _, report = fast.apply(model, None, device="cpu")
    assert report.bias_forms == [] and report.fused_residual == ["encoder", "decoder"]
    assert not report.left_plain  # the table per layer needs no twin
    assert report.swapped["Attention"] == 3 + 2 * 2


def test_umt5_export_loads_in_transformers_without_key_warnings(tmp_path, spiece_path):
    from t5forge.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", model_type="umt5", position="t5_bias_per_layer", dropout_rate=0.0)).eval()
    export_hf(model, load_tokenizer(spiece_path), tmp_path / "hf")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage().lower())
    logging.getLogger("transformers").addHandler(handler)
    try:
        hf = transformers.UMT5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in messages if any(w in m for w in ("missing", "unexpected", "newly initialized"))], messages
    torch.testing.assert_close(logits(hf, 32100), logits(model, 32100), rtol=1e-5, atol=5e-5)
    # and t5forge reads its own export back as the same model
    again, tokenizer = load_model(tmp_path / "hf")
    assert again.config == model.config.replace(attention_backend="sdpa") and tokenizer.vocab_size == 32100


def test_export_names_the_family_that_has_the_position_scheme(tmp_path):
    per_layer_t5 = T5(T5Config.from_name("tiny", position="t5_bias_per_layer"))
    with pytest.raises(T5ForgeError, match=r"cannot export to HF T5: model\.position='t5_bias_per_layer' has no HF T5 "
                                           r"equivalent \(HF's T5 knows 't5_bias'; HF's UMT5 has it: "
                                           r"model\.model_type=umt5\)"):
        export_hf(per_layer_t5, None, tmp_path / "a")
    one_table_umt5 = T5(T5Config.from_name("tiny", model_type="umt5"))
    with pytest.raises(T5ForgeError, match=r"cannot export to HF UMT5: model\.position='t5_bias' .* HF's T5 has it"):
        export_hf(one_table_umt5, None, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_t5forge_model_dir_keeps_the_family(tmp_path):
    model = T5(T5Config.from_name("tiny", model_type="umt5", position="t5_bias_per_layer"))
    save_model_dir(model, None, tmp_path)
    assert json.loads((tmp_path / "model_config.json").read_text())["model_type"] == "umt5"
    loaded, _ = load_model(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.decoder.position.layers[1].weight, model.decoder.position.layers[1].weight)


def test_every_umt5_table_learns_and_cached_generation_equals_a_full_recompute():
    config = t5forge_config("umt5")
    model = twin(hf_reference(config), config, "sdpa")
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    hidden = model(input_ids, attention_mask, labels=labels).hidden
    model.logits(hidden).logsumexp(-1).sum().backward()
    for stack in (model.encoder, model.decoder):
        assert all(t.weight.grad.abs().sum() > 0 for t in stack.position.layers)
    out = model.generate(input_ids[:2], attention_mask[:2], max_new_tokens=5)
    start = torch.full((2, 1), config.decoder_start_token_id)
    with torch.no_grad():  # the cache's last step against the whole decoder input at once
        full = model(input_ids[:2], attention_mask[:2], decoder_input_ids=torch.cat([start, out[:, :-1]], 1)).hidden
    assert torch.equal(model.logits(full).argmax(-1)[:, :5][out != 0], out[out != 0])


def test_pretrain_a_umt5_from_scratch_and_export_it(tmp_path, tiny_pretrain_args):
    from t5forge.cli import main

    run = tmp_path / "run"
    assert main(tiny_pretrain_args(run, "model.position=t5_bias_per_layer", "model.model_type=umt5")) == 0
    config = json.loads((run / "checkpoints" / "step-00000006" / "model_config.json").read_text())
    assert (config["model_type"], config["position"]) == ("umt5", "t5_bias_per_layer")
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "hf"))
    assert type(hf).__name__ == "UMT5ForConditionalGeneration"
