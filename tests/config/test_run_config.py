"""load_config / save_config: layering, strict keys and types, validation, exact reload."""

import dataclasses

import pytest

from t5forge.config import RunConfig, describe_keys
from t5forge.config_files import config_to_yaml, load_config, save_config
from t5forge.errors import T5ForgeError


def test_defaults_are_nanot5_default_yaml():
    cfg = load_config([])
    assert cfg == RunConfig()
    # nanoT5 configs/default.yaml
    assert (cfg.seed, cfg.precision, cfg.mode) == (2137, "bf16", "pt")
    assert (cfg.model.name, cfg.model.random_init, cfg.model.dropout_rate, cfg.model.compile) == (
        "google/t5-v1_1-base", True, 0.0, None)
    assert (cfg.data.input_length, cfg.data.mlm_probability, cfg.data.mean_noise_span_length, cfg.data.num_workers) == (
        512, 0.15, 3.0, 8)
    o = cfg.optim
    assert (o.name, o.base_lr, o.batch_size, o.total_steps, o.warmup_steps) == ("adamwscale", 2e-2, 128, 65536, 10000)
    assert (o.lr_scheduler, o.weight_decay, o.grad_clip, o.grad_acc, o.final_cosine) == ("cosine", 0.0, 1.0, 1, 1e-5)
    # logging.every_steps null: the plan's automatic interval, nanoT5's 100 at this length (test_plan_intervals.py)
    assert (cfg.eval.every_steps, cfg.eval.steps, cfg.checkpoint.every_steps, cfg.logging.every_steps) == (
        100000, 500, 100000, None)


def test_config_is_frozen():
    cfg = load_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.base_lr = 1.0


def test_overrides_parse_types():
    cfg = load_config(["optim.base_lr=1e-3", "optim.batch_size=64", "model.compile=true", "model.d_model=256",
                       "data.train_files=[a.json.gz,b.json.gz]", "optim.time_budget=1h30m", "seed=7"])
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.batch_size == 64 and cfg.model.compile is True and cfg.model.d_model == 256
    assert cfg.data.train_files == ["a.json.gz", "b.json.gz"]
    assert cfg.optim.time_budget == "1h30m" and cfg.seed == 7


def test_single_file_becomes_a_list():
    assert load_config(["data.train_files=/data/c4.json.gz"]).data.train_files == ["/data/c4.json.gz"]


def test_layering_order(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("optim:\n  base_lr: 0.005\n  total_steps: 1000\nmodel:\n  d_ff: 256\n")
    cfg = load_config(["optim.total_steps=300", "task=pt_tiny", f"config={f}"])
    assert cfg.model.name == "tiny"  # from the preset
    assert cfg.optim.base_lr == 0.005 and cfg.model.d_ff == 256  # file over preset
    assert cfg.optim.total_steps == 300  # override over file, wherever it sits in argv


def test_base_argument():
    cfg = load_config(["optim.base_lr=1e-4"], base="ft")
    assert cfg.mode == "ft" and cfg.optim.name == "adamw" and cfg.optim.base_lr == 1e-4
    again = load_config([], base=cfg)
    assert again == cfg


@pytest.mark.parametrize("item, key, listed", [
    ("optim.lrr=1", "optim.lrr", "base_lr"),
    ("optimizer.lr=1", "optimizer", "optim"),
    ("model.dmodel=4", "model.dmodel", "d_model"),
    ("optim.base_lr.x=1", "optim.base_lr.x", None),
])
def test_unknown_key_names_it(item, key, listed):
    with pytest.raises(T5ForgeError) as err:
        load_config([item])
    assert repr(key) in str(err.value) or key in str(err.value)
    if listed:
        assert listed in str(err.value)


@pytest.mark.parametrize("item, key, expected", [
    ("optim.batch_size=abc", "optim.batch_size", "integer"),
    ("seed=1.5", "seed", "integer"),
    ("model.compile=maybe", "model.compile", "true or false"),
    ("optim.base_lr=fast", "optim.base_lr", "number"),
    ("model.d_model=big", "model.d_model", "integer or null"),
])
def test_wrong_type_names_key(item, key, expected):
    with pytest.raises(T5ForgeError) as err:
        load_config([item])
    assert f"'{key}'" in str(err.value) and expected in str(err.value)


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  base_lr: 0.01\n  warmup: 10\n")
    with pytest.raises(T5ForgeError, match=r"bad.yaml.*optim\.warmup.*warmup_steps"):
        load_config([f"config={f}"])


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("optim:\n  base_lr: 0.01\n batch_size: [1\n")
    with pytest.raises(T5ForgeError, match=r"broken.yaml line \d+"):
        load_config([f"config={f}"])


def test_section_given_a_value(tmp_path):
    with pytest.raises(T5ForgeError, match="model is a section"):
        load_config(["model=t5-small"])
    f = tmp_path / "s.yaml"
    f.write_text("optim: 3\n")
    with pytest.raises(T5ForgeError, match="optim is a section"):
        load_config([f"config={f}"])


@pytest.mark.parametrize("items, message", [
    (["optim.name=sgd"], "optim.name"),
    (["optim.lr_scheduler=step"], "optim.lr_scheduler"),
    (["precision=fp16"], "precision"),
    (["device=gpu"], "write cuda"),
    (["optim.warmup_steps=100", "optim.total_steps=100"], "optim.warmup_steps"),
    (["optim.batch_size=10", "optim.grad_acc=3"], "divisible by optim.grad_acc"),
    (["optim.epochs=2"], "fine-tuning only"),
    (["optim.time_budget=4 hours"], "optim.time_budget"),
    (["model.attention=flash"], "model.attention"),
    (["model.num_heads=0"], "model.num_heads"),
    (["data.mlm_probability=1.5"], "data.mlm_probability"),
    (["optim.final_cosine=0.5"], "optim.final_cosine"),
    (["optim.lr_scheduler=inverse_sqrt", "optim.warmup_steps=0"], "optim.warmup_steps"),
    (["data.train_files=[a,{b: 1}]"], "data.train_files"),
    (["task=pt", "task=pt_8h"], "task= given twice"),
    (["task=nope"], "presets: pt"),
    (["optim.base_lr"], "KEY=VALUE"),
    (["+optim.new=1"], "KEY=VALUE"),
    (["checkpoint.every_minutes=-1"], "checkpoint.every_minutes"),
])
def test_invalid_values_are_named(items, message):
    with pytest.raises(T5ForgeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(items)


def test_resume_spellings():
    assert load_config(["resume=false"]).resume == "false"
    assert load_config(["resume=auto"]).resume == "auto"
    assert load_config(["resume=true"]).resume == "auto"
    assert load_config(["resume=runs/x/checkpoints/step-00000100"]).resume == "runs/x/checkpoints/step-00000100"


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(["task=pt_cpu", "optim.base_lr=3e-3", "optim.final_cosine=1e-6", "data.train_files=[a.json,b.json]",
                       "model.tie_word_embeddings=true", "model.layer_norm_epsilon=1e-5", "resume=auto",
                       "optim.time_budget=90m", "out_dir=runs/x", "model.feed_forward_proj=gated-silu"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_config([f"config={path}"])
    # The run's definition: the process instruction resume=auto is not saved (see test_saved_config.py).
    assert again == dataclasses.replace(cfg, resume="false")
    assert config_to_yaml(again) == path.read_text()  # a fixed point: saving again changes nothing


def test_saved_defaults_reload_even_if_a_preset_is_given_first(tmp_path):
    # A saved file is complete: whatever preset sits under it, the file wins everywhere.
    cfg = load_config(["optim.total_steps=12345"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(["task=pt_tiny", f"config={tmp_path / 'c.yaml'}"]) == cfg


def test_every_key_is_documented():
    rows = describe_keys()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) > 60
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]
    for needed in ("optim.base_lr", "optim.time_budget", "data.input_length", "model.checkpoint_path", "checkpoint.keep_last"):
        assert needed in keys
