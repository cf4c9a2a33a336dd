"""A run's config.yaml is the run's definition: it reruns and continues the run from any directory.

`stop_at_step` and `resume` say how one process runs, so they are saved at their neutral values;
every local path is saved absolute. Real `t5forge pretrain` processes (pt_tiny, the C4 sample, the
T5 vocabulary), launched with relative paths from one directory and continued from another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from t5forge import cli
from t5forge.config_files import load_config, with_run_dir

STEPS = 6


def start(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "t5forge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen) -> str:
    """The stdout of a t5forge process that must succeed."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return out


def tiny_run(out_dir, data_dir, cwd, *extra):
    """argv of a pt_tiny run whose paths are written relative to `cwd`, as a user types them."""
    rel = lambda p: os.path.relpath(p, cwd)  # noqa: E731
    c4 = data_dir / "c4-sample"
    return ["pretrain", "task=pt_tiny", f"out_dir={rel(out_dir)}",
            f"data.tokenizer={rel(data_dir / 't5-spiece' / 'spiece.model')}",
            f"data.train_files=[{rel(c4 / 'c4-en.train-00000-first1000.json.gz')}]",
            f"data.validation_files=[{rel(c4 / 'c4-en.olmo-sample-1000.json.gz')}]",
            f"optim.total_steps={STEPS}", "eval.every_steps=3", "eval.steps=1", "checkpoint.every_steps=3",
            "logging.every_steps=1", *extra]


def history(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss")) for r in records]


def test_saved_config_continues_a_stopped_run_from_another_directory(tmp_path, data_dir):
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch.mkdir(), elsewhere.mkdir()
    straight, split = launch / "straight", launch / "split"
    # Both first runs at once: single-threaded processes, so a second core halves the wait.
    runs = [start(*tiny_run(straight, data_dir, launch), cwd=launch),
            start(*tiny_run(split, data_dir, launch, "stop_at_step=3"), cwd=launch)]
    for proc in runs:
        finish(proc)

    saved_text = (split / "config.yaml").read_text()
    saved = yaml.safe_load(saved_text)
    assert saved["stop_at_step"] == 0 and saved["resume"] == "false"  # the definition, not this process's orders
    assert saved["out_dir"] == str(split)
    assert saved["data"]["tokenizer"] == str(data_dir / "t5-spiece" / "spiece.model")
    assert saved["data"]["train_files"] == [str(data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz")]
    assert saved["data"]["validation_files"] == [str(data_dir / "c4-sample" / "c4-en.olmo-sample-1000.json.gz")]
    assert saved["model"]["name"] == "tiny"  # a built-in architecture, not a path
    assert "t5forge pretrain config=THIS_FILE resume=auto" in saved_text.splitlines()[1]
    assert (split / "checkpoints" / "step-00000003" / "config.yaml").read_text() == saved_text

    # From another directory, the saved file alone continues the run to its end.
    out = finish(start("pretrain", f"config={split / 'config.yaml'}", "resume=auto", cwd=elsewhere))
    assert f"resumed from {split / 'checkpoints' / 'step-00000003'} at step 3" in out
    assert f"done: {STEPS} steps" in out
    assert history(split) == history(straight)
    assert [h[0] for h in history(split) if h[1] == "train"] == list(range(1, STEPS + 1))
    assert not (elsewhere / "runs").exists()
    # The continued run saved the same definition again.
    assert (split / "config.yaml").read_text() == saved_text
    assert (split / "checkpoints" / f"step-{STEPS:08d}" / "config.yaml").read_text() == saved_text


def test_every_local_path_is_absolute_and_hub_ids_stay(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like the built-in architecture: `tiny` still means the built-in
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    sni = Path(os.path.relpath(data_dir / "sni", tmp_path))
    cfg = with_run_dir(load_config([
        "out_dir=runs/ft", f"finetune.sni_dir={sni}", "finetune.train_files=[a.jsonl,sub/b.jsonl]",
        "finetune.validation_files=[c.jsonl]", "model.checkpoint_path=my-model", "data.tokenizer=google/t5-v1_1-base",
    ], base="ft"), "finetune")
    assert cfg.out_dir == str(tmp_path / "runs" / "ft")
    assert cfg.finetune.sni_dir == str(data_dir / "sni")
    assert cfg.finetune.train_files == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "b.jsonl")]
    assert cfg.finetune.validation_files == [str(tmp_path / "c.jsonl")]
    assert cfg.model.checkpoint_path == str(model_dir)
    assert cfg.data.tokenizer == "google/t5-v1_1-base"  # no such local path: a Hub id

    assert with_run_dir(load_config(["model.name=tiny"]), "pretrain").model.name == "tiny"
    local = with_run_dir(load_config(["model.name=my-model", "data.train_files=[c4/*.json.gz]"]), "pretrain")
    assert local.model.name == str(model_dir)
    assert local.data.train_files == [str(tmp_path / "c4" / "*.json.gz")]  # a glob stays a glob, made absolute
    assert local.out_dir.startswith(str(tmp_path / "runs" / "pretrain-"))


@pytest.mark.parametrize("command,items,key,value", [
    ("pretrain", ["task=pt_cpu"], "data.input_length", "128"),
    ("pretrain", [], "data.input_length", "512"),
    ("pretrain", ["task=pt_tiny", "optim.base_lr=3e-3"], "optim.base_lr", "0.003"),
    ("finetune", ["task=ft_tiny"], "model.name", "tiny"),
    ("finetune", [], "optim.lr_scheduler", "constant"),
])
def test_list_keys_and_print_config_show_the_resolved_values(command, items, key, value, capsys):
    assert cli.main([command, "--list-keys", *items]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.split()[0] == key]
    assert row.split()[1] == value
    # --print-config among the items (argv order kept) prints the same value
    assert cli.main([command, *items[:1], "--print-config", *items[1:]]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    section, name = key.split(".")
    assert str(printed[section][name]) == value
