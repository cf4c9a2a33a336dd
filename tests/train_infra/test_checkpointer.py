"""Checkpoints: atomic writes, keep_last, exact round trip of every part, resume resolution, strict loading."""

import json

import numpy as np
import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.loss import seq2seq_loss
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer
from t5forge.train import checkpoint as ckpt
from t5forge.train import rng
from t5forge.train.checkpoint import Checkpointer, latest, list_checkpoints, load, resolve_resume
from t5forge.train.checkpoint_parts import Value, run_parts
from t5forge.train.state import TrainState

CONFIG_TEXT = "model:\n  name: tiny\noptim:\n  base_lr: 0.001\n"


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 32000, (2, 12), generator=g), "labels": torch.randint(3, 32000, (2, 5), generator=g)}


def _train_step(model, optimizer, seed):
    model.train()
    seq2seq_loss(model, **_batch(seed)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _setup(seed=0, **config_changes):
    torch.manual_seed(seed)
    model = T5(T5Config.from_name("tiny").replace(**config_changes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer, seed)  # so the optimizer has moments to save
    return model, optimizer


def _save(checkpointer, model, optimizer, tokenizer, step, data_state=None):
    return checkpointer.save(run_parts(model=model, tokenizer=tokenizer, optimizer=optimizer,
                                       train_state=TrainState(step=step, tokens_seen=34 * step), data=Value(data_state),
                                       config_text=CONFIG_TEXT), step=step)


def test_round_trip_continues_exactly(tmp_path, tokenizer):
    model, optimizer = _setup()
    state = TrainState(step=7, tokens_seen=238, examples_seen=14, elapsed_train_seconds=12.5, best_eval_loss=9.1,
                       best_eval_step=5)
    data_state = {"file_index": 3, "offset": 1234, "buffer": np.arange(6), "rng": np.random.default_rng(5).bit_generator.state}
    path = Checkpointer(tmp_path, keep_last=2).save(run_parts(model=model, tokenizer=tokenizer, optimizer=optimizer,
                                                                train_state=state, data=Value(data_state),
                                                                config_text=CONFIG_TEXT), step=state.step)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert set(ckpt.REQUIRED_FILES) <= {p.name for p in path.iterdir()}
    assert (path / "config.yaml").read_text() == CONFIG_TEXT
    assert json.loads((path / "train_state.json").read_text())["tokens_seen"] == 238
    # The uninterrupted run: one more step from here (dropout draws from the RNG saved above).
    _train_step(model, optimizer, seed=1)

    fresh, fresh_opt = _setup(seed=99)
    loaded_state, rng_state, loaded_data = load(path, fresh, fresh_opt)
    assert loaded_state == state
    assert loaded_data["offset"] == 1234 and np.array_equal(loaded_data["buffer"], np.arange(6))
    assert loaded_data["rng"] == data_state["rng"]
    rng.restore(rng_state)
    _train_step(fresh, fresh_opt, seed=1)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_opt.state_dict()["state"][0]["step"] == 2


def test_checkpoint_is_a_model_directory(tmp_path, tokenizer):
    from t5forge.model.load import load_model

    model, optimizer = _setup()
    path = _save(Checkpointer(tmp_path), model, optimizer, tokenizer, step=3)
    for target in (path, tmp_path):  # a checkpoint, and the run directory (its newest checkpoint)
        loaded, tok = load_model(target)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
        assert tok.vocab_size == tokenizer.vocab_size


class _CrashingAdamW(torch.optim.AdamW):
    def state_dict(self):
        raise OSError("No space left on device")


def test_crash_mid_save_leaves_only_an_ignored_tmp(tmp_path, tokenizer):
    model, optimizer = _setup()
    _save(Checkpointer(tmp_path), model, optimizer, tokenizer, step=1)
    crashing = _CrashingAdamW(model.parameters())
    with pytest.raises(OSError, match="No space"):
        _save(Checkpointer(tmp_path), model, crashing, tokenizer, step=2)
    partial = tmp_path / "checkpoints" / "step-00000002.tmp"
    assert (partial / "model.safetensors").exists() and not (partial / "optimizer.pt").exists()
    assert latest(tmp_path) == tmp_path / "checkpoints" / "step-00000001"
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step-00000001"
    with pytest.raises(T5ForgeError, match="still being written"):
        resolve_resume(str(partial), tmp_path)
    Checkpointer(tmp_path)  # the next run's checkpointer clears the leftover
    assert not partial.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path, tokenizer):
    model, optimizer = _setup()
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        _save(checkpointer, model, optimizer, tokenizer, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    # The same step saved again replaces it; steps after it (a discarded history) are dropped.
    _save(checkpointer, model, optimizer, tokenizer, 30, data_state={"again": True})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030"]
    assert load(tmp_path / "checkpoints" / "step-00000030", model)[2] == {"again": True}
    with pytest.raises(T5ForgeError, match="checkpoint.keep_last"):
        Checkpointer(tmp_path, keep_last=0)


def test_resolve_resume(tmp_path, tokenizer):
    run = tmp_path / "run"
    assert resolve_resume("false", run) is None and resolve_resume(False, run) is None
    assert resolve_resume("auto", run) is None  # nothing saved yet: a fresh start
    model, optimizer = _setup()
    checkpointer = Checkpointer(run)
    first = _save(checkpointer, model, optimizer, tokenizer, 5)
    second = _save(checkpointer, model, optimizer, tokenizer, 6)
    assert resolve_resume("auto", run) == second
    assert resolve_resume(str(first), tmp_path / "elsewhere") == first
    assert resolve_resume(str(run), tmp_path / "elsewhere") == second
    with pytest.raises(T5ForgeError, match="no such file"):
        resolve_resume(str(tmp_path / "nope"), run)
    with pytest.raises(T5ForgeError, match="is a file"):
        resolve_resume(str(first / "optimizer.pt"), run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(T5ForgeError, match="not a t5forge checkpoint"):
        resolve_resume(str(tmp_path / "empty"), run)
    (second / "rng.pt").unlink()
    with pytest.raises(T5ForgeError, match="lacks rng.pt"):
        resolve_resume(str(second), run)
    with pytest.warns(UserWarning, match="lacks rng.pt"):
        assert resolve_resume("auto", run) == first
    with pytest.raises(T5ForgeError, match="lacks rng.pt"):
        load(second, model)


def test_strict_loading_names_the_keys(tmp_path, tokenizer):
    model, optimizer = _setup()
    path = _save(Checkpointer(tmp_path), model, optimizer, tokenizer, 1)
    wider, _ = _setup(d_ff=96)
    with pytest.raises(T5ForgeError, match=r"shape mismatch: .*wi_0.weight \[128, 64\] vs model \[96, 64\]"):
        load(path, wider)
    deeper, _ = _setup(num_layers=3)
    with pytest.raises(T5ForgeError, match=r"missing from the checkpoint: .*blocks.2"):
        load(path, deeper)
    shallower, _ = _setup(num_layers=1)
    with pytest.raises(T5ForgeError, match=r"not in the model: .*blocks.1"):
        load(path, shallower)


def test_optimizer_and_world_size_mismatch(tmp_path, tokenizer):
    model, optimizer = _setup()
    path = _save(Checkpointer(tmp_path), model, optimizer, tokenizer, 1)
    with pytest.raises(T5ForgeError, match="holds AdamW state but this run uses SGD"):
        load(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(T5ForgeError, match="written by 1 processes and this run has 2"):
        load(path, model, rank=1, world_size=2)


def test_resume_reads_weights_saved_under_an_older_parameter_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from t5forge.model.load import LEGACY_NAMES, save_model_dir
    from t5forge.train.checkpoint_parts import load_model_weights

    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", dropout_rate=0.0))
    save_model_dir(model, None, tmp_path)
    new_to_old = {new: old for old, new in LEGACY_NAMES.items()}
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({new_to_old.get(k, k): v for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    assert "encoder.relative_bias.weight" in load_file(str(tmp_path / "model.safetensors"))
    fresh = T5(T5Config.from_name("tiny", dropout_rate=0.0))
    load_model_weights(tmp_path, fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
