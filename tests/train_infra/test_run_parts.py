"""The run directory's one rule for a complete checkpoint (run_layout.py), shared by load_model and
resume; named checkpoint parts (checkpoint_parts.py): a part a run registers is saved and restored
on resume without the Checkpointer knowing it."""

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.load import load_model, newest_checkpoint, resolve_model_dir
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer
from t5forge.train import run_lock
from t5forge.train.checkpoint import Checkpointer, resolve_resume
from t5forge.train.checkpoint_parts import RNGStreams, Value, load_parts, rng_reseeded_from, run_parts
from t5forge.train.state import TrainState


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


def _model(seed):
    torch.manual_seed(seed)
    model = T5(T5Config.from_name("tiny"))
    return model, torch.optim.AdamW(model.parameters())


def _parts(model, optimizer, tokenizer, step, **extra):
    return {**run_parts(model=model, tokenizer=tokenizer, optimizer=optimizer, train_state=TrainState(step=step),
                        data=Value({"step": step}), config_text="x: 1\n"), **extra}


def _damage(checkpoint, how):
    if how == "flipped weights":  # same size: only the manifest's checksum sees it
        file = checkpoint / "model.safetensors"
        data = bytearray(file.read_bytes())
        data[len(data) - 5] ^= 0xFF
        file.write_bytes(bytes(data))
    elif how == "bad manifest":
        (checkpoint / "manifest.json").write_text("{not json")
    else:  # a truncated optimizer state: the weights themselves are fine
        file = checkpoint / "optimizer.pt"
        file.write_bytes(file.read_bytes()[:100])


@pytest.mark.parametrize("how", ["flipped weights", "bad manifest", "truncated optimizer"])
def test_load_model_on_a_run_takes_the_checkpoint_resume_takes(tmp_path, tokenizer, how):
    run = tmp_path / "run"
    checkpointer = Checkpointer(run)
    older, opt = _model(seed=1)
    first = checkpointer.save(_parts(older, opt, tokenizer, 1), step=1)
    newer, opt = _model(seed=2)
    second = checkpointer.save(_parts(newer, opt, tokenizer, 2), step=2)
    run_lock.release(run)
    assert newest_checkpoint(run) == second and resolve_model_dir(run) == second

    _damage(second, how)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-00000002"):
        assert resolve_resume("auto", run) == first
    for target in (run, run / "checkpoints"):  # `load_model RUN` and `evaluate RUN` resolve through here
        with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-00000002"):
            assert newest_checkpoint(target) == first
            assert resolve_model_dir(target) == first
        with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
            loaded, _ = load_model(target)
        for name, tensor in older.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_run_directory_without_a_complete_checkpoint_is_refused(tmp_path, tokenizer):
    run = tmp_path / "run"
    model, opt = _model(seed=1)
    only = Checkpointer(run).save(_parts(model, opt, tokenizer, 1), step=1)
    run_lock.release(run)
    (only / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        with pytest.raises(T5ForgeError, match="nor a run directory with complete checkpoints"):
            load_model(run)


class WeightAverage:
    """A real piece of run state beyond t5forge's own: an exponential moving average of the weights."""

    def __init__(self, model, decay=0.5):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def test_an_extra_part_is_saved_and_restored(tmp_path, tokenizer):
    model, opt = _model(seed=1)
    ema = WeightAverage(model, decay=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    path = Checkpointer(tmp_path).save(_parts(model, opt, tokenizer, 3, ema=ema), step=3)
    run_lock.release(tmp_path)
    assert (path / "ema.pt").is_file() and '"ema.pt"' in (path / "manifest.json").read_text()

    fresh, fresh_opt = _model(seed=9)
    restored = WeightAverage(fresh, decay=0.9)
    state = TrainState()
    parts = {**run_parts(model=fresh, tokenizer=None, optimizer=fresh_opt, train_state=state, data=Value(),
                         config_text=""), "ema": restored}
    load_parts(path, parts)
    assert restored.decay == 0.25 and state.step == 3
    for name, tensor in ema.shadow.items():
        assert torch.equal(restored.shadow[name], tensor), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    # A checkpoint written without the part: a clear error naming it, not a silent fresh EMA.
    plain = Checkpointer(tmp_path / "plain").save(_parts(model, opt, tokenizer, 1), step=1)
    run_lock.release(tmp_path / "plain")
    with pytest.raises(T5ForgeError, match="lacks ema.pt.*written without"):
        load_parts(plain, parts)


class SaveCounter:
    """Counts the checkpoints it was saved in: each save hands out one more than the last."""

    def __init__(self):
        self.saves = 0

    def state_dict(self):
        self.saves += 1
        return {"saves": torch.tensor(self.saves)}

    def load_state_dict(self, state):
        self.saves = int(state["saves"])


def test_a_part_a_task_registers_is_resumed_by_the_run(tmp_path, tiny_pretrain_args):
    from t5forge.config_files import load_config
    from t5forge.train.pretrain import PretrainTask
    from t5forge.train.run_builder import run_task

    class CountingPretrain(PretrainTask):
        def extra_parts(self, run, loader):
            self.counter = SaveCounter()
            return {"counter": self.counter}

    out = tmp_path / "run"
    argv = tiny_pretrain_args(out, "checkpoint.every_steps=2", "eval.steps=0")[1:]
    first = CountingPretrain()
    assert run_task(load_config([*argv, "stop_at_step=4"]), first) == 0
    assert first.counter.saves == 2  # steps 2 and 4
    second = CountingPretrain()
    assert run_task(load_config([*argv, "resume=auto"]), second) == 0
    run_lock.release(out)
    # Restored from step 4's checkpoint (2 saves), then saved at step 6: without the restore it would be 1.
    assert second.counter.saves == 3
    saved = torch.load(out / "checkpoints" / "step-00000006" / "counter.pt", weights_only=True)
    assert int(saved["saves"]) == 3


def test_rng_streams_say_whether_they_were_restored_or_reseeded(tmp_path):
    """The resume line's source: a checkpoint of the same number of ranks restores this rank's RNG
    streams; one of another number reseeds them, and the part remembers the saved number of ranks."""
    from t5forge.train import rng

    reseeds = []
    parts = run_parts(model=None, tokenizer=None, optimizer=None, train_state=None, data=None, config_text=None,
                      rng_streams=RNGStreams(0, 1, reseed=reseeds.append))
    torch.manual_seed(5)
    saved, drawn = rng.capture(), torch.rand(3)
    parts["rng"].load_ranks(tmp_path / "rng.pt", {"world_size": 1, "ranks": [saved]}, 0, 1)
    assert rng_reseeded_from(parts) is None and torch.equal(torch.rand(3), drawn) and reseeds == []
    parts["rng"].load_ranks(tmp_path / "rng.pt", {"world_size": 2, "ranks": [saved, saved]}, 0, 1)
    assert rng_reseeded_from(parts) == 2 and reseeds == [2]
