"""Model directories: HF export/import, t5forge model dirs, checkpoints, run dirs, and their errors."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from hf_twins import CONFIGS, hf_reference, padded_batch, t5forge_config

from t5forge.errors import T5ForgeError
from t5forge.model import components
from t5forge.model.config import T5Config
from t5forge.model.hf import HF_REDUNDANT, export_hf, hf_parameter_shapes, load_hf, t5forge_to_hf_name
from t5forge.model.load import (LEGACY_NAMES, legacy_renames, load_model, newest_checkpoint, save_model_dir,
                                upgrade_state_dict)
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
# An untied lm_head drawn with std 1 gives logits of O(30): fp32 rounding reaches ~2e-5 absolute.
LOGIT_TOL = dict(rtol=1e-5, atol=5e-5)


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


def tiny(tied: bool, **kw) -> T5:
    torch.manual_seed(0)
    proj = "relu" if tied else "gated-gelu"
    return T5(T5Config.from_name("tiny", tie_word_embeddings=tied, feed_forward_proj=proj, dropout_rate=0.0, **kw)).eval()


def logits(model, vocab=32100):
    input_ids, attention_mask, labels = padded_batch(vocab)
    with torch.no_grad():
        if isinstance(model, T5):
            return model.logits(model(input_ids, attention_mask, labels=labels).hidden)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def hf_from_pretrained(directory):
    """T5ForConditionalGeneration.from_pretrained, returning the model and the warnings it logged."""
    capture, logger = _Capture(), logging.getLogger("transformers")
    logger.addHandler(capture)
    try:
        model = transformers.T5ForConditionalGeneration.from_pretrained(str(directory))
    finally:
        logger.removeHandler(capture)
    return model.eval(), capture.messages


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_without_key_warnings(tmp_path, tokenizer, tied):
    model = tiny(tied)
    export_hf(model, tokenizer, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "spiece.model"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    hf, warnings = hf_from_pretrained(tmp_path / "hf")
    for message in warnings:
        low = message.lower()
        assert not any(w in low for w in ("missing", "unexpected", "newly initialized", "not initialized")), message
        # transformers 5 always declares T5's lm_head tied and says so when a v1.1 model has its own
        assert not tied and "will not tie them" in low, message
    torch.testing.assert_close(logits(hf), logits(model), **LOGIT_TOL)
    assert (hf.lm_head.weight is hf.shared.weight) == tied
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Studies have shown that <extra_id_0> is good for you."
    assert hf_tok(text).input_ids == tokenizer.encode(text)
    # HF generation from the exported dir agrees with ours.
    ids = torch.tensor([tokenizer.encode("translate English to German: The house is wonderful.")])
    ref = hf.generate(input_ids=ids, do_sample=False, num_beams=2, max_new_tokens=8)[:, 1:]
    ours = model.generate(ids, max_new_tokens=8, num_beams=2)
    assert torch.equal(ours, ref.masked_fill((ref == 1).cumsum(1) - (ref == 1).long() > 0, 0))


@pytest.mark.parametrize("tied", [False, True])
def test_load_hf_save_pretrained_dir(tmp_path, tokenizer, tied):
    config = T5Config.from_name("tiny", tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu",
                                dropout_rate=0.0)
    hf = hf_reference(config)
    hf.save_pretrained(str(tmp_path / "hf"))
    shutil.copy(tokenizer.source, tmp_path / "hf" / "spiece.model")
    model, tok = load_model(tmp_path / "hf", attention_backend="eager")
    assert model.config.tie_word_embeddings == tied and model.config.attention_backend == "eager"
    assert tok.vocab_size == 32100
    torch.testing.assert_close(logits(model.eval()), logits(hf), **LOGIT_TOL)


def test_load_hf_pytorch_bin(tmp_path):
    config = T5Config.from_name("tiny", vocab_size=120, dropout_rate=0.0)
    hf = hf_reference(config)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model, tok = load_hf(tmp_path)
    assert tok is None
    torch.testing.assert_close(logits(model.eval(), 120), logits(hf, 120), **LOGIT_TOL)


def test_model_dir_checkpoint_and_run_dir(tmp_path, tokenizer):
    run = tmp_path / "run"
    models = {}
    for step in (1, 2):
        models[step] = tiny(False, d_ff=96 + step)  # different shapes tell the checkpoints apart
        save_model_dir(models[step], tokenizer, run / "checkpoints" / f"step-{step:08d}")
    (run / "checkpoints" / "step-00000003.tmp").mkdir()  # an interrupted save: never picked
    save_model_dir(tiny(False), tokenizer, run / "checkpoints" / "step-00000004.tmp")
    files = {p.name for p in (run / "checkpoints" / "step-00000001").iterdir()}
    assert {"model.safetensors", "model_config.json", "spiece.model"} <= files

    assert newest_checkpoint(run).name == "step-00000002"
    for path in (run, run / "checkpoints", run / "checkpoints" / "step-00000002"):
        model, tok = load_model(path)
        assert model.config.d_ff == 98 and tok.vocab_size == 32100
        torch.testing.assert_close(logits(model.eval()), logits(models[2]))
    model, _ = load_model(str(run / "checkpoints" / "step-00000001"), dtype="bf16")
    assert model.config.d_ff == 97 and model.shared.weight.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo warns about torch.jit
def test_save_unwraps_compiled_model(tmp_path):
    model = tiny(True)
    save_model_dir(torch.compile(model), None, tmp_path)  # compile is lazy: no compilation happens here
    loaded, tok = load_model(tmp_path)
    assert tok is None
    torch.testing.assert_close(loaded.shared.weight, model.shared.weight)


def test_load_errors(tmp_path, tokenizer):
    with pytest.raises(T5ForgeError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(T5ForgeError, match="neither a model directory"):
        load_model(tmp_path)

    bart = tmp_path / "bart"
    bart.mkdir()
    (bart / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 16}))
    with pytest.raises(T5ForgeError, match=r"bart.config\.json: model_type is 'bart'"):
        load_model(bart)

    small_vocab = tmp_path / "small_vocab"
    save_model_dir(tiny(True, vocab_size=1000), tokenizer, small_vocab)
    with pytest.raises(T5ForgeError, match="tokenizer .* has 32100 ids but the model's vocab_size is 1000"):
        load_model(small_vocab)

    wrong = tmp_path / "wrong"
    save_model_dir(tiny(False), None, wrong)
    cfg = json.loads((wrong / "model_config.json").read_text())
    (wrong / "model_config.json").write_text(json.dumps({**cfg, "d_ff": 77}))
    with pytest.raises(T5ForgeError, match="has shape .* check that config and weights belong together"):
        load_model(wrong)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(T5Config.from_name("tiny").to_hf_dict()))
    with pytest.raises(T5ForgeError, match="holds no weights"):
        load_model(no_weights)


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(T5ForgeError, match="'t5forge-tests/no-such-model' is not a local path, and the Hugging Face Hub is not available"):
        load_model("t5forge-tests/no-such-model")


# ---------------------------------------------------------------------------------------------------
# Export knows what HF's T5 can express, and refuses the rest before writing anything.

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_parameter_shapes_are_what_transformers_builds(name):
    config = t5forge_config(name)
    hf_sd = hf_reference(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in hf_sd.items() if k not in HF_REDUNDANT}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # transformers keeps the tied alias; it is not a weight of its own
    assert hf_parameter_shapes(config) == expected


def refused(model, tmp_path, message):
    with pytest.raises(T5ForgeError, match=message) as err:
        export_hf(model, None, tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()  # checked before any file is written
    return str(err.value)


@pytest.mark.parametrize("field, hf_kind", sorted(components.HF_T5.items()))
def test_export_refuses_a_component_hf_t5_lacks(tmp_path, monkeypatch, field, hf_kind):
    name = "squared_relu" if field == "feed_forward" else "other"
    if name == "other":  # no other component of this kind exists yet: T5's own class under another name
        monkeypatch.setitem(components.REGISTRIES[field], "other", components.component(field, hf_kind))
    model = T5(tiny(False).config.replace(**{field: name}))
    text = refused(model, tmp_path, rf"cannot export to HF T5: model\.{field}='{name}' has no HF T5 equivalent")
    assert f"HF's T5 knows {hf_kind!r}" in text and "keep the t5forge checkpoint" in text


@dataclasses.dataclass(frozen=True)
class QKNormConfig(T5Config):
    qk_norm: bool = False  # a later t5forge-only setting: its default is T5's behaviour


def test_export_refuses_a_t5forge_setting_hf_t5_lacks(tmp_path):
    model = tiny(False)
    model.config = QKNormConfig(**dataclasses.asdict(model.config), qk_norm=True)
    refused(model, tmp_path, r"model\.qk_norm=True has no HF T5 equivalent")
    model.config = model.config.replace(qk_norm=False, attention_backend="eager")
    export_hf(model, None, tmp_path / "hf")  # the default and the compute back end export
    assert "qk_norm" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def _module_of(model, hf_name):
    """(parent module, attribute) of the t5forge module holding HF's weight `hf_name`."""
    ours = next(n for n in model.state_dict() if t5forge_to_hf_name(n) == hf_name)
    parent, attr = ours.removesuffix(".weight").rsplit(".", 1)
    return model.get_submodule(parent), attr


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_export_refuses_a_model_without_its_relative_bias(tmp_path, stack):
    model = tiny(True)
    hf_name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    parent, attr = _module_of(model, hf_name)
    setattr(parent, attr, torch.nn.Identity())  # a position scheme without weights
    text = refused(model, tmp_path, "cannot export to HF T5: the model has no weight for HF's")
    assert hf_name in text and "at random" in text


def test_export_refuses_a_weight_hf_t5_has_no_place_for(tmp_path):
    model = tiny(False)
    model.encoder.gate = torch.nn.Linear(4, 4, bias=False)
    refused(model, tmp_path, r"the model's weight 'encoder\.gate\.weight' has no place in HF's T5")
    del model.encoder.gate
    model.lm_head = torch.nn.Linear(64, 77, bias=False)
    refused(model, tmp_path, r"weight 'lm_head\.weight' has shape \(77, 64\) but HF's T5 for this config has")
    tied = tiny(True)
    tied.lm_head = torch.nn.Linear(64, tied.config.vocab_size, bias=False)  # untied weights, tied config
    refused(tied, tmp_path, r"HF's T5 for this config has no lm_head\.weight")


# ---------------------------------------------------------------------------------------------------
# t5forge's own directories: parameters saved under an older name still load.

def test_legacy_names_are_renamed_to_the_models_names():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    old = {"encoder.relative_bias.weight": a, "decoder.relative_bias.weight": b, "shared.weight": c}
    now = {"encoder.position.weight", "decoder.position.weight", "shared.weight"}
    assert LEGACY_NAMES == {"encoder.relative_bias.weight": "encoder.position.weight",
                            "decoder.relative_bias.weight": "decoder.position.weight"}
    assert upgrade_state_dict(old, now) == {"encoder.position.weight": a, "decoder.position.weight": b,
                                            "shared.weight": c}
    # nothing is renamed for a model that still has the old name, nor onto a name the file already holds
    assert upgrade_state_dict(old, set(old)) == old
    both = {**old, "encoder.position.weight": c}
    assert legacy_renames(both, now) == {"decoder.relative_bias.weight": "decoder.position.weight"}


def test_a_model_dir_saved_under_legacy_names_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny(False)
    save_model_dir(model, None, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    old_name = {new: old for old, new in LEGACY_NAMES.items()}
    save_file({old_name.get(k, k): v for k, v in stored.items()}, str(tmp_path / "model.safetensors"))
    assert set(LEGACY_NAMES) <= set(load_file(str(tmp_path / "model.safetensors")))
    loaded, _ = load_model(tmp_path)
    torch.testing.assert_close(logits(loaded.eval()), logits(model))
