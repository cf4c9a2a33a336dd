"""Continued pre-training from released weights (model.checkpoint_path): the checkpoint keeps its
architecture and vocabulary, a tokenizer that does not fit its embedding rows is refused with the
numbers, and the optimizer and schedule start afresh at step 0 unless optim.resume_optimizer takes
a t5forge checkpoint's. Through the real CLI on real C4 text with T5's real vocabulary."""

import json
from pathlib import Path

import pytest
import torch

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.hf import export_hf
from t5forge.model.load import save_model_dir
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer
from t5forge.train.setup import check_tokenizer_fits


@pytest.fixture(autouse=True)
def _cli_log_handlers():
    """Drop the logging handlers a CLI call adds (they would write to capsys' closed stream later)."""
    import logging

    logger = logging.getLogger("t5forge")
    before = list(logger.handlers)
    yield
    for handler in [h for h in logger.handlers if h not in before]:
        logger.removeHandler(handler)


def train_records(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("rows, fits", [(32100, True), (32128, True), (32099, False), (32000, False),
                                        (32129, False), (250112, False)])
def test_embedding_rows_must_be_the_tokenizers_ids_up_to_t5_rounding(spiece_path, rows, fits):
    tokenizer = load_tokenizer(spiece_path)  # 32,100 ids
    if fits:
        check_tokenizer_fits(tokenizer, rows, "ckpt")
    else:
        with pytest.raises(T5ForgeError, match=rf"has 32,100 ids but the checkpoint ckpt has {rows:,} embedding rows"):
            check_tokenizer_fits(tokenizer, rows, "ckpt")


def test_mt5_checkpoint_refuses_t5s_tokenizer_with_the_numbers(tmp_path, c4_pretrain_args, capsys):
    # an HF mT5 directory without its tokenizer files: 250,112 rows (a narrow model, to stay small)
    torch.manual_seed(0)
    config = T5Config(vocab_size=250112, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, model_type="mt5",
                      tie_word_embeddings=False)
    export_hf(T5(config), None, tmp_path / "mt5")
    rc = main(c4_pretrain_args(tmp_path / "run", f"model.checkpoint_path={tmp_path / 'mt5'}", "optim.total_steps=3"))
    assert rc == 2
    err = one_line_error(capsys)
    assert "spiece.model has 32,100 ids but the checkpoint" in err and "has 250,112 embedding rows" in err
    assert "they fit a tokenizer of 249,985 to 250,112 ids" in err and "data.tokenizer=" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, c4_pretrain_args):
    """A 6-step pt_tiny run (checkpoints at 3 and 6) and its run directory."""
    run = tmp_path_factory.mktemp("first") / "run"
    assert main(c4_pretrain_args(run, "optim.total_steps=6", "checkpoint.every_steps=3", "eval.steps=0",
                                 "logging.every_steps=1")) == 0
    return run


def test_conflicting_architecture_overrides_are_refused_equal_ones_pass(tmp_path, tiny_checkpoint, c4_pretrain_args,
                                                                        capsys):
    # pt_cpu sets d_model=128, d_kv=32, d_ff=512, num_layers=4 (heads 4 = tiny's): all but heads conflict
    args = c4_pretrain_args(tmp_path / "a", f"model.checkpoint_path={tiny_checkpoint}", "task=pt_cpu")
    assert main([a for a in args if a != "task=pt_tiny"] + ["optim.total_steps=3", "optim.warmup_steps=1"]) == 2
    err = one_line_error(capsys)
    assert "keeps its own architecture and vocabulary" in err
    for conflict in ("model.d_model=128 (the checkpoint has 64)", "model.d_ff=512 (the checkpoint has 128)",
                     "model.num_layers=4 (the checkpoint has 2)"):
        assert conflict in err
    assert "model.num_heads" not in err and "model.d_model=null" in err
    assert main(c4_pretrain_args(tmp_path / "b", f"model.checkpoint_path={tiny_checkpoint}", "model.d_model=64",
                                 "optim.total_steps=3", "eval.steps=0")) == 0


def test_optimizer_and_schedule_start_afresh_unless_asked(tmp_path, tiny_checkpoint, c4_pretrain_args, caplog):
    first = {r["step"]: r["lr"] for r in train_records(tiny_checkpoint)}
    step3 = tiny_checkpoint / "checkpoints" / "step-00000003"
    common = ("optim.total_steps=6", "eval.steps=0", "logging.every_steps=1", "checkpoint.every_steps=100")

    fresh = tmp_path / "fresh"
    assert main(c4_pretrain_args(fresh, f"model.checkpoint_path={step3}", *common)) == 0
    records = train_records(fresh)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r["step"]: r["lr"] for r in records} == first  # the same schedule, from step 0 again
    saved = torch.load(fresh / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in saved["state_dict"]["state"].values()} == {6.0}  # 6 updates, not 3 + 6

    kept = tmp_path / "kept"
    with caplog.at_level("INFO", logger="t5forge"):
        assert main(c4_pretrain_args(kept, f"model.checkpoint_path={step3}", "optim.resume_optimizer=true",
                                     *common)) == 0
    assert any("optimizer state and schedule of" in m and "at step 3" in m for m in caplog.messages)
    records = train_records(kept)
    assert [r["step"] for r in records] == [4, 5, 6]
    assert {r["step"]: r["lr"] for r in records} == {s: first[s] for s in (4, 5, 6)}  # the schedule continues
    saved = torch.load(kept / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in saved["state_dict"]["state"].values()} == {6.0}  # 3 taken + 3 more
    assert json.loads((kept / "checkpoints" / "step-00000006" / "train_state.json").read_text())["step"] == 6


def test_resume_optimizer_needs_a_t5forge_checkpoint(tmp_path, tiny_checkpoint, c4_pretrain_args, spiece_path, capsys):
    with pytest.raises(T5ForgeError, match="optim.resume_optimizer=True: .* set model.checkpoint_path"):
        load_config(["optim.resume_optimizer=true"])
    model_dir = tmp_path / "weights_only"
    save_model_dir(T5(T5Config.from_name("tiny")), load_tokenizer(spiece_path), model_dir)
    assert main(c4_pretrain_args(tmp_path / "a", f"model.checkpoint_path={model_dir}", "optim.resume_optimizer=true",
                                 "optim.total_steps=3")) == 2
    err = one_line_error(capsys)
    assert "needs a t5forge training checkpoint" in err and "optimizer.pt and train_state.json" in err
    assert main(c4_pretrain_args(tmp_path / "b", f"model.checkpoint_path={tiny_checkpoint}",
                                 "optim.resume_optimizer=true", "optim.total_steps=6")) == 2
    err = one_line_error(capsys)
    assert "at step 6, but the run has 6 steps" in err and "raise optim.total_steps" in err
