"""Each config key's own rules (on its `_key`), the cross-key rules, and how --list-keys shows them.

The bad values are derived from each rule's --list-keys text (`>= 8` -> 7, `in (0, 1)` -> 1, ...),
so a rule whose text and check disagree fails here, and a key given a new rule is covered at once.
"""

import dataclasses
import re
import typing

import pytest

from t5forge import cli
from t5forge.config import (
    CROSS_KEY_RULES, RETIRED_KEYS, RunConfig, _leaves, check_value, describe_keys, validate,
)
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError

# Rules that are not a bound or a choice: one bad value each, by rule text.
SPECIAL_BAD = {
    "not empty": "  ",
    "file paths": ["a.jsonl", ""],
    "auto | cpu | cuda | cuda:N": "gpu",
    "a duration (4h, 90m, 1h30m, 45s) or ''": "4 hours",
    "a registered name (model/components.py)": "nope",
    "1 or 2": 3,
    "a list of denoisers like [R:3:0.15:2,X:64:0.5:1,S:0.25:3]": ["R:3:0.15"],
}


def _bad_values(rule_text: str, tp) -> list:
    """Values just outside the rule (both ends of an interval)."""
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if rule_text in SPECIAL_BAD:
        return [SPECIAL_BAD[rule_text]]
    if rule_text.startswith("one of: "):
        return ["nope"]
    if m := re.fullmatch(r">= (\S+)", rule_text):
        low = float(m[1])
        return [int(low) - 1 if base is int else low - 0.5]
    if m := re.fullmatch(r"> (\S+)", rule_text):
        return [base(float(m[1]))]
    if m := re.fullmatch(r"in ([\[(])(\S+), (\S+)([\])])", rule_text):
        low, high = float(m[2]), float(m[3])
        return [low if m[1] == "(" else low - 0.5, high if m[4] == ")" else high + 0.5]
    raise AssertionError(f"no bad value known for rule {rule_text!r}: add one to SPECIAL_BAD")


def _with(cfg: RunConfig, key: str, value) -> RunConfig:
    section, _, name = key.rpartition(".")
    if not section:
        return dataclasses.replace(cfg, **{name: value})
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


OWN_RULES = [(key, rule, tp) for key, f, tp, _ in _leaves() for rule in f.metadata["rules"]]


@pytest.mark.parametrize("key, rule, tp", OWN_RULES, ids=[f"{k}:{r.text}" for k, r, _ in OWN_RULES])
def test_every_rule_of_every_key_rejects_a_value_outside_it(key, rule, tp):
    cfg = RunConfig()
    validate(cfg)  # the defaults keep every rule
    for bad in _bad_values(rule.text, tp):
        with pytest.raises(T5ForgeError) as err:
            validate(_with(cfg, key, bad))
        message = str(err.value)
        if key == "optim.time_budget":  # the duration parser words its own message
            assert message.startswith(f"{key}={bad!r} is not a duration"), message
        else:
            assert message == f"config key {key}={bad!r}: {rule.problem(bad)}"


def test_rules_are_on_the_keys_that_had_them():
    rules = {key: [r.text for r in f.metadata["rules"]] for key, f, _, _ in _leaves()}
    assert len(OWN_RULES) >= 50
    assert rules["model.attention"] == ["one of: sdpa | eager | flex"]
    assert rules["data.input_length"] == [">= 8"]
    assert rules["optim.rollback_lr_factor"] == ["in (0, 1]"]
    assert rules["model.dropout_rate"] == ["in [0, 1)"]
    assert rules["seed"] == [] and rules["logging.wandb"] == []


def test_null_keeps_the_rules_of_an_optional_key():
    cfg = load_config(["eval.every_steps=null", "model.num_heads=null"])
    assert cfg.eval.every_steps is None and cfg.model.num_heads is None
    with pytest.raises(T5ForgeError, match=r"config key model\.num_heads=0: must be >= 1 \(or null to keep model\.name's value\)"):
        load_config(["model.num_heads=0"])


CROSS_CASES = {
    "needed for pre-training unless data.train_files": (["data.dataset=''"], "data.dataset", "is empty and data.train_files"),
    "divisible by optim.grad_acc": (["optim.batch_size=10", "optim.grad_acc=3"], "optim.batch_size",
                                    "must be divisible by optim.grad_acc=3"),
    ">= 1 unless optim.epochs > 0": (["optim.total_steps=0"], "optim.total_steps", "must be >= 1 (or set optim.epochs"),
    "fine-tuning only": (["optim.epochs=2"], "optim.epochs", "applies to fine-tuning only"),
    ">= 1 for inverse_sqrt": (["optim.lr_scheduler=inverse_sqrt", "optim.warmup_steps=0"], "optim.warmup_steps",
                              "must be >= 1 for inverse_sqrt"),
    "< optim.total_steps for cosine, linear": (["optim.warmup_steps=100", "optim.total_steps=100"], "optim.warmup_steps",
                                               "must be < optim.total_steps=100 for cosine"),
    "in [0, optim.base_lr]": (["optim.final_cosine=0.5"], "optim.final_cosine", "must be in [0, optim.base_lr=0.02]"),
    "needs model.checkpoint_path": (["optim.resume_optimizer=true"], "optim.resume_optimizer",
                                    "takes the optimizer state of the starting checkpoint"),
}


def test_every_cross_key_rule_is_exercised():
    assert sorted(CROSS_CASES) == sorted(rule.text for rule in CROSS_KEY_RULES)


@pytest.mark.parametrize("text", sorted(CROSS_CASES))
def test_cross_key_rules_name_their_key(text):
    items, key, what = CROSS_CASES[text]
    with pytest.raises(T5ForgeError) as err:
        load_config(items)
    assert str(err.value).startswith(f"config key {key}=") and what in str(err.value), str(err.value)


def test_final_cosine_below_zero_keeps_its_message():
    with pytest.raises(T5ForgeError, match=r"config key optim\.final_cosine=-1\.0: must be in \[0, optim\.base_lr=0\.02\]"):
        load_config(["optim.final_cosine=-1.0"])


def test_check_value_is_the_keys_rule():
    check_value("data.num_workers", 0)
    with pytest.raises(T5ForgeError, match=r"^config key data\.num_workers=-1: must be >= 0$"):
        check_value("data.num_workers", -1)
    check_value("eval.every_steps", None)  # null: automatic


def test_list_keys_shows_each_keys_constraint(capsys):
    rows = {key: constraint for key, _, _, _, constraint in describe_keys()}
    assert rows["model.attention"] == "one of: sdpa | eager | flex"
    assert rows["optim.grad_acc"] == ">= 1"
    assert rows["eval.every_steps"] == ">= 1, or null"
    assert rows["optim.warmup_steps"] == ">= 0; >= 1 for inverse_sqrt; < optim.total_steps for cosine, linear"
    assert rows["seed"] == ""
    assert cli.main(["pretrain", "--list-keys"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["model.attention"].endswith("[one of: sdpa | eager | flex]")
    assert lines["data.input_length"].endswith("[>= 8]")
    assert "[" not in lines["seed"]


@pytest.mark.parametrize("key", sorted(RETIRED_KEYS))
def test_retired_keys_are_unknown_on_the_command_line(key):
    with pytest.raises(T5ForgeError, match=rf"unknown config key '{re.escape(key)}' \(removed: "):
        load_config([f"{key}=true"])


def test_an_old_runs_config_file_with_retired_keys_still_loads(tmp_path, caplog):
    old = tmp_path / "config.yaml"
    old.write_text("logging:\n  every_steps: 5\n  grad_l2: true\n  weights_l2: false\n")
    with caplog.at_level("WARNING", logger="t5forge.config_files"):
        cfg = load_config([f"config={old}"])
    assert cfg.logging.every_steps == 5
    assert not any(f.name in ("grad_l2", "weights_l2") for f in dataclasses.fields(cfg.logging))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "ignoring logging.grad_l2" in warned and "ignoring logging.weights_l2" in warned


def test_loaders_keep_the_configs_rules_and_words(spiece_path):
    """The loaders take config values as arguments; they check them with the config's (and the
    Plan's) rules, so a direct caller gets the same error a config file would."""
    from t5forge.data.finetune_loader import FinetuneLoader
    from t5forge.data.loader import build_pretrain_loader
    from t5forge.data.seq2seq import Seq2SeqExample
    from t5forge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spiece_path)
    examples = [Seq2SeqExample(id="a", source="translate: x", references=("y",))]
    lengths = dict(max_source_length=16, max_target_length=8)
    with pytest.raises(T5ForgeError, match=r"^optim\.batch_size=10 is not divisible by optim\.grad_acc \(3\) x world size \(1\)"):
        FinetuneLoader(examples, tokenizer, batch_size=10, grad_acc=3, **lengths)
    with pytest.raises(T5ForgeError, match=r"^config key optim\.grad_acc=0: must be >= 1$"):
        FinetuneLoader(examples, tokenizer, batch_size=10, grad_acc=0, **lengths)
    with pytest.raises(T5ForgeError, match=r"^config key data\.num_workers=-1: must be >= 0$"):
        build_pretrain_loader(tokenizer=str(spiece_path), dataset=None, batch_size=2, num_workers=-1)
