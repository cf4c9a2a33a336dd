"""Checkpoint integrity: damaged files are detected and skipped, a same-step re-save never loses a copy,
one process per run directory, a full disk is one clear error, built-in model names are not shadowed."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer
from t5forge.train.checkpoint import Checkpointer, latest, load, resolve_resume
from t5forge.train.checkpoint_parts import Value, run_parts
from t5forge.train import run_lock
from t5forge.train.state import TrainState


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


def _save(run, tokenizer, step, seed=0):
    torch.manual_seed(seed)
    model = T5(T5Config.from_name("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    path = Checkpointer(run).save(run_parts(model=model, tokenizer=tokenizer, optimizer=opt,
                                            train_state=TrainState(step=step), data=Value({"step": step}),
                                            config_text="x: 1\n"), step=step)
    run_lock.release(run)  # as at the end of a run, so a subprocess can take the directory
    return path, model, opt


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "data.pt"])
@pytest.mark.parametrize("how", ["truncate", "empty", "flip"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, tokenizer, name, how):
    first, _, _ = _save(tmp_path, tokenizer, 1)
    newest, model, opt = _save(tmp_path, tokenizer, 2)
    file = newest / name
    data = bytearray(file.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    else:
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
    file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step-00000002: {name}"):
        assert resolve_resume("auto", tmp_path) == first
    with pytest.raises(T5ForgeError, match=f"damaged .*{name}"):
        resolve_resume(str(newest), tmp_path)
    assert load(first, model, opt)[2] == {"step": 1}
    assert newest.exists()  # left for a look, not silently deleted


def test_unreadable_file_without_manifest_is_a_clear_error(tmp_path, tokenizer):
    path, model, opt = _save(tmp_path, tokenizer, 1)
    (path / "manifest.json").unlink()  # as written before manifests existed
    (path / "rng.pt").write_bytes(b"")
    with pytest.raises(T5ForgeError, match="rng.pt is unreadable"):
        load(path, model, opt)


def test_crash_between_the_swap_renames_keeps_the_step(tmp_path, tokenizer, spiece_path):
    _save(tmp_path, tokenizer, 1)
    script = textwrap.dedent(f"""
        import os, torch
        from t5forge.model.config import T5Config
        from t5forge.model.t5 import T5
        from t5forge.tokenizer import load_tokenizer
        from t5forge.train.checkpoint import Checkpointer
        from t5forge.train.checkpoint_parts import Value, run_parts
        from t5forge.train.state import TrainState
        real = os.rename
        def crash_after_first(src, dst):
            real(src, dst)
            if str(src).endswith("step-00000001"):
                os._exit(9)
        os.rename = crash_after_first
        model = T5(T5Config.from_name("tiny"))
        Checkpointer({str(tmp_path)!r}).save(run_parts(model=model, tokenizer=load_tokenizer({str(spiece_path)!r}),
            optimizer=torch.optim.AdamW(model.parameters()), train_state=TrainState(step=1), data=Value({{"new": 1}}),
            config_text="x: 1\\n"), step=1)
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 9
    assert (tmp_path / "checkpoints" / "step-00000001.old").is_dir()
    found = resolve_resume("auto", tmp_path)
    assert found is not None and load(found, T5(T5Config.from_name("tiny")))[2] == {"step": 1}
    Checkpointer(tmp_path)  # the next start restores the old copy under its name
    run_lock.release(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


def test_second_process_on_the_run_directory_is_refused(tmp_path, tokenizer):
    _save(tmp_path, tokenizer, 1)
    run_lock.acquire(tmp_path)  # this process runs on the directory
    script = f"from t5forge.train.checkpoint import Checkpointer; Checkpointer({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", f"from t5forge.cli import *\ntry:\n {script}\nexcept T5ForgeError as e:\n print(e); raise SystemExit(2)"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"is in use by another t5forge run (pid {os.getpid()}" in done.stdout
    assert latest(tmp_path) is not None
    run_lock.release(tmp_path)


def test_full_disk_is_one_clear_error_and_leaves_no_partial(tmp_path, tokenizer, spiece_path):
    first, _, _ = _save(tmp_path, tokenizer, 1)
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from t5forge.errors import T5ForgeError
        from t5forge.model.config import T5Config
        from t5forge.model.t5 import T5
        from t5forge.tokenizer import load_tokenizer
        from t5forge.train.checkpoint import Checkpointer
        from t5forge.train.checkpoint_parts import Value, run_parts
        from t5forge.train.state import TrainState
        model = T5(T5Config.from_name("tiny"))
        opt = torch.optim.AdamW(model.parameters())
        ck = Checkpointer({str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))
        try:
            ck.save(run_parts(model=model, tokenizer=load_tokenizer({str(spiece_path)!r}), optimizer=opt,
                              train_state=TrainState(step=2), data=Value(None), config_text="x: 1\\n"), step=2)
        except T5ForgeError as e:
            print(e); sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "the disk refused a checkpoint write in" in done.stdout and "needed" in done.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert resolve_resume("auto", tmp_path) == first


def test_builtin_model_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    from t5forge.config_files import load_config
    from t5forge.plan import resolve_model_config

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text('{"d_model": 512}')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["model.name=tiny"])
    assert resolve_model_config(cfg).d_model == T5Config.from_name("tiny").d_model
