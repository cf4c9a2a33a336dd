"""Where `t5forge finetune` takes its starting weights from: without model.checkpoint_path the `ft`
preset wants model.name's released weights, and offline the error names the keys that fix it
(before any tokenizer is loaded); a local model directory as model.name starts the run, its own
tokenizer included. Through the real CLI on the real SNI subset."""

import logging

import pytest
from safetensors import safe_open

from t5forge.cli import main


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face Hub client in offline mode with an empty cache: nothing can be downloaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_ft_without_checkpoint_path_names_the_missing_key(cli_log_handlers, offline_hub, tmp_path, sni_dir, capsys):
    # The ft preset: model.random_init=false, model.name and data.tokenizer the Hub's google/t5-v1_1-base.
    assert main(["finetune", "task=ft", f"out_dir={tmp_path / 'run'}", f"finetune.sni_dir={sni_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "fine-tuning starts from pre-trained weights" in err
    assert "model.checkpoint_path=DIR (a t5forge run, checkpoint or HF T5 directory)" in err
    assert "model.random_init=true to fine-tune from scratch" in err
    assert "model.name=<hub id> needs the Hugging Face Hub: model.name='google/t5-v1_1-base' could not be fetched" in err
    assert "tokenizer" not in err  # checked before data.tokenizer (also a Hub id) is loaded

    # A built-in architecture name has no released weights to start from.
    assert main(["finetune", "task=ft", "model.name=tiny", f"out_dir={tmp_path / 'run2'}",
                 f"finetune.sni_dir={sni_dir}"]) == 2
    err = capsys.readouterr().err
    assert "model.name='tiny' is neither a local directory nor a Hub id" in err and "model.random_init=true" in err


def test_local_model_dir_as_model_name_starts_the_run(cli_log_handlers, offline_hub, tmp_path, tiny_model_dir, sni_dir, caplog, capsys):
    caplog.set_level(logging.INFO, logger="t5forge")
    out = tmp_path / "run"
    assert main(["finetune", "task=ft_tiny", "model.random_init=false", f"model.name={tiny_model_dir}",
                 "data.tokenizer=google/t5-v1_1-base",  # not loaded: the model directory has its own
                 f"out_dir={out}", f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=2",
                 "finetune.max_seq_len=128", "optim.total_steps=2", "eval.steps=0"]) == 0
    assert any("from model.name's weights" in r.getMessage() for r in caplog.records)
    assert "vocabulary: 32,128 rows (the starting weights'; tokenizer: 32,100 ids)" in capsys.readouterr().out
    start = safe_open(str(tiny_model_dir / "model.safetensors"), "pt").get_tensor("shared.weight")
    after = safe_open(str(out / "checkpoints" / "step-00000002" / "model.safetensors"), "pt").get_tensor("shared.weight")
    assert start.shape == after.shape and (start - after).abs().max() < 0.1  # trained from those weights, not afresh
