"""Every preset parses through the real `t5forge pretrain` CLI; error paths exit 2 with one line."""

import subprocess
import sys
import types

import pytest
import yaml

from t5forge import cli
from t5forge.config_files import load_config
from t5forge.presets import PRESETS, preset_names

PRETRAIN_PRESETS = [n for n in preset_names() if PRESETS[n].get("mode", "pt") == "pt"]
FINETUNE_PRESETS = [n for n in preset_names() if PRESETS[n].get("mode", "pt") == "ft"]

# nanoT5 configs/task/pt_*h.yaml: (warmup_steps, batch_size, total_steps, grad_acc)
NANOT5_HOURS = {
    "pt_4h": (1666, 256, 13333, 2), "pt_8h": (3332, 256, 26666, 2), "pt_12h": (5000, 256, 39999, 2),
    "pt_16h": (6666, 256, 53332, 2), "pt_20h": (8332, 256, 66665, 2), "pt_24h": (10000, 256, 79998, 2),
}


def _print_config(capsys, *items):
    rc = cli.main(["pretrain", *items, "--print-config"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_all_expected_presets_exist():
    assert {"pt", "ft", "pt_cpu", "pt_tiny", *NANOT5_HOURS} <= set(preset_names())


@pytest.mark.parametrize("name", PRETRAIN_PRESETS)
def test_pretrain_preset_prints_and_reloads(name, capsys, tmp_path):
    rc, out, err = _print_config(capsys, f"task={name}")
    assert rc == 0, err
    printed = yaml.safe_load(out)
    assert printed["mode"] == "pt"
    (tmp_path / "c.yaml").write_text(out)
    assert load_config([f"config={tmp_path / 'c.yaml'}"]) == load_config([f"task={name}"])


@pytest.mark.parametrize("name", sorted(NANOT5_HOURS))
def test_nanot5_hour_presets(name, capsys):
    rc, out, _ = _print_config(capsys, f"task={name}")
    o = yaml.safe_load(out)["optim"]
    assert (o["warmup_steps"], o["batch_size"], o["total_steps"], o["grad_acc"]) == NANOT5_HOURS[name]
    assert (o["name"], o["base_lr"], o["lr_scheduler"], o["final_cosine"]) == ("adamwscale", 0.02, "cosine", 1e-5)


@pytest.mark.parametrize("name", FINETUNE_PRESETS)
def test_finetune_presets_parse_and_pretrain_refuses_them(name, capsys):
    cfg = load_config([f"task={name}"])
    assert cfg.mode == "ft"
    rc, out, err = _print_config(capsys, f"task={name}")
    assert rc == 2 and out == ""
    assert "t5forge finetune" in err and len(err.strip().splitlines()) == 1


def test_ft_is_nanot5_tk_instruct():
    cfg = load_config(["task=ft"])
    o = cfg.optim
    assert (o.name, o.base_lr, o.batch_size, o.epochs, o.lr_scheduler, o.grad_clip, o.warmup_steps) == (
        "adamw", 5e-5, 8, 2, "constant", 0.0, 0)
    assert cfg.precision == "fp32" and cfg.eval.steps == 200
    f = cfg.finetune
    assert (f.max_seq_len, f.max_target_len, f.max_num_instances_per_task, f.num_pos_examples) == (1024, 128, 100, 2)


def test_unknown_key_exits_2_with_one_line(capsys):
    rc, out, err = _print_config(capsys, "task=pt_tiny", "optim.lrr=1")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0] and "base_lr" in lines[0]


def test_wrong_type_exits_2_naming_key(capsys):
    rc, _, err = _print_config(capsys, "optim.batch_size=lots")
    assert rc == 2 and "optim.batch_size" in err and len(err.strip().splitlines()) == 1


def test_subprocess_print_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "t5forge", "pretrain", "task=pt_tiny", "optim.total_steps=33",
                          "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (tmp_path / "c.yaml").write_text(out.stdout)
    cfg = load_config([f"config={tmp_path / 'c.yaml'}"])
    assert cfg.optim.total_steps == 33 and cfg.model.name == "tiny"


def test_list_tasks_and_keys(capsys):
    assert cli.main(["pretrain", "--list-tasks"]) == 0
    assert "pt_8h" in capsys.readouterr().out
    assert cli.main(["pretrain", "--list-keys"]) == 0
    assert "optim.base_lr" in capsys.readouterr().out


def test_missing_trainer_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "t5forge.train.pretrain", None)  # import now fails as if absent
    rc = cli.main(["pretrain", "task=pt_tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "training is not available" in err


def test_pretrain_hands_the_resolved_config_to_the_trainer(monkeypatch, capsys, tmp_path):
    seen = []
    fake = types.ModuleType("t5forge.train.pretrain")
    fake.run_pretrain = lambda cfg: seen.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "t5forge.train.pretrain", fake)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "task=pt_tiny", "optim.base_lr=3e-3"]) == 0
    (cfg,) = seen
    assert cfg.optim.base_lr == 3e-3 and cfg.out_dir.startswith(f"{tmp_path}/runs/pretrain-")
    # Nothing else differs from what load_config gives.
    assert cfg.__class__(**{**cfg.__dict__, "out_dir": ""}) == load_config(["task=pt_tiny", "optim.base_lr=3e-3"])
    seen.clear()
    assert cli.main(["pretrain", "task=pt_tiny", "out_dir=/tmp/x"]) == 0 and seen[0].out_dir == "/tmp/x"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["pretrain", "task=pt_tiny"]) == 2
    assert "out_dir" in capsys.readouterr().err
