"""`t5forge ablate`: two arms pre-trained on the real C4 sample with a 3-step budget (results,
table, curves), a repeat that reruns nothing, a half-done arm that resumes, and the spec's errors."""

import json
import math

import pytest
import yaml

from t5forge.cli import main


def _base(c4_pretrain_args):
    """The fixture's pretrain items that every arm shares (its out_dir is the ablation's to set)."""
    return [item for item in c4_pretrain_args("unused")[1:] if not item.startswith("out_dir=")]


def _write(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ARMS = {"baseline": [], "squared_relu": ["model.feed_forward=squared_relu"]}


def _mtimes(arm_dir):
    return {p: p.stat().st_mtime_ns for p in sorted(arm_dir.rglob("*")) if p.is_file()}


def test_two_arms_train_compare_and_are_not_rerun(tmp_path, c4_pretrain_args, capsys):
    spec = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), "budget": 3, "arms": ARMS})
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "training arm baseline" in first and "training arm squared_relu" in first

    results = json.loads((out / "results.json").read_text())
    rows = {r["arm"]: r for r in results["arms"]}
    assert list(rows) == ["baseline", "squared_relu"]
    for row in rows.values():
        assert row["steps"] == 3 and row["finished"]
        assert math.isfinite(row["final_eval_loss"]) and math.isfinite(row["best_eval_loss"])
        assert row["best_eval_loss"] <= row["final_eval_loss"]
        assert row["parameters"] > 0 and row["active_parameters"] == row["parameters"]
        assert row["tokens_per_s"] > 0 and row["train_seconds"] > 0 and row["peak_rss_mib"] > 0
        assert row["eval_curve"] and row["eval_curve"][-1][1] == 3
    # Different models (squared ReLU changes the feed-forward's activation, not its shapes) ...
    assert rows["baseline"]["final_eval_loss"] != rows["squared_relu"]["final_eval_loss"]
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in ARMS}
    assert configs["squared_relu"]["model"]["feed_forward"] == "squared_relu"
    assert configs["baseline"]["model"]["feed_forward"] in (None, "dense")
    # ... trained on the same data and seed, scored on the same held-out batches, for the same budget.
    for key in ("data", "eval", "seed"):
        assert configs["baseline"][key] == configs["squared_relu"][key], key
    assert configs["baseline"]["optim"]["total_steps"] == configs["squared_relu"]["optim"]["total_steps"] == 3

    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| squared_relu |" in table and "3 steps" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Repeated: nothing trains again, not a file of either arm is rewritten; the results are rebuilt.
    before = {name: _mtimes(out / name) for name in ARMS}
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("finished already") == 2 and "training arm" not in again
    assert {name: _mtimes(out / name) for name in ARMS} == before
    assert json.loads((out / "results.json").read_text())["arms"] == results["arms"]

    # An arm whose run did not finish resumes from its checkpoint instead of starting over.
    marker = out / "squared_relu" / "ablate-arm.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "finished": False}))
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    resumed = capsys.readouterr().out
    assert "resuming arm squared_relu" in resumed and "resumed from" in resumed
    assert "training arm baseline" not in resumed and json.loads(marker.read_text())["finished"]

    # The same directory with an arm changed is refused before anything trains.
    _write(spec, {"base": _base(c4_pretrain_args), "budget": 3,
                  "arms": {**ARMS, "squared_relu": ["model.feed_forward=dense"]}})
    assert main(["ablate", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another spec" in err and str(out / "squared_relu") in err


BAD_SPECS = [
    ({"budget": 3, "arms": ARMS, "runs": 2}, "unknown key(s) runs"),
    ({"budget": 3, "arms": {}}, "arms must name at least one arm"),
    ({"budget": 3}, "arms must name at least one arm"),
    ({"arms": ARMS}, "budget is required"),
    ({"budget": "5 minutes", "arms": ARMS}, "budget='5 minutes' is not a duration"),
    ({"budget": 0, "arms": ARMS}, "a step budget must be >= 1"),
    ({"budget": 3, "arms": {"../up": []}}, "arm name '../up' cannot be a directory name"),
    ({"budget": 3, "arms": {"a": "model.feed_forward=squared_relu"}}, "arms.a must be a list of KEY=VALUE"),
    ({"budget": 3, "arms": {"a": ["squared_relu"]}}, "arms.a: 'squared_relu' is not KEY=VALUE"),
    ({"budget": 3, "arms": {"a": ["seed=1"]}}, "arms.a sets seed; every arm shares"),
    ({"budget": 3, "arms": {"a": ["data.input_length=32"]}}, "arms.a sets data.input_length"),
    ({"budget": 3, "arms": {"a": ["optim.total_steps=9"]}}, "arms.a sets optim.total_steps, which budget:"),
    ({"base": ["out_dir=/tmp/x"], "budget": 3, "arms": ARMS}, "base sets out_dir"),
    ({"base": ["optim.total_steps=9"], "budget": 3, "arms": ARMS}, "base sets optim.total_steps, which budget:"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_is_refused_naming_file_and_key(tmp_path, c4_pretrain_args, capsys, spec, message):
    path = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), **spec})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_arm_the_architecture_refuses_stops_before_any_arm_trains(tmp_path, c4_pretrain_args, capsys):
    # pt_tiny's 2 layers leave the hourglass encoder no block to shorten (1 before, 1 after).
    arms = {"baseline": [], "hourglass": ["model.encoder=hourglass"]}
    path = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), "budget": 3, "arms": arms})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: arm hourglass:" in err and "hourglass_pre" in err and "raise num_layers" in err, err
    assert not (tmp_path / "out").exists()


def test_arm_override_that_is_no_config_key_stops_before_any_arm_trains(tmp_path, c4_pretrain_args, capsys):
    arms = {"baseline": [], "typo": ["model.feed_foward=squared_relu"]}
    path = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), "budget": 3, "arms": arms})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: arm typo:" in err and "feed_foward" in err, err
    assert not (tmp_path / "out").exists()  # the valid first arm did not start either


@pytest.mark.parametrize("text, message", [
    ("arms: [\n", "is not valid YAML"),
    ("- a\n- b\n", "an ablation spec is a mapping"),
])
def test_spec_that_is_not_a_mapping_is_refused(tmp_path, capsys, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err


def test_missing_spec_and_foreign_directory(tmp_path, c4_pretrain_args, capsys):
    assert main(["ablate", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    # A directory another command wrote is not mistaken for an arm to resume.
    (tmp_path / "out" / "baseline").mkdir(parents=True)
    (tmp_path / "out" / "baseline" / "metrics.jsonl").write_text("")
    path = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), "budget": 3, "arms": ARMS})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "did not write" in capsys.readouterr().err


def test_time_budget_trains_each_arm_for_that_long(tmp_path, c4_pretrain_args, capsys):
    # The base's optim.total_steps stays the step cap under a time budget: high, so the time decides.
    spec = _write(tmp_path / "spec.yaml", {"base": [*_base(c4_pretrain_args), "optim.total_steps=100000"],
                                           "budget": "2s", "arms": {"baseline": []}})
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    assert "warm-up step" in capsys.readouterr().out
    (row,) = json.loads((out / "results.json").read_text())["arms"]
    assert row["train_seconds"] >= 2 and row["steps"] >= 1 and math.isfinite(row["final_eval_loss"])
    assert yaml.safe_load((out / "baseline" / "config.yaml").read_text())["optim"]["time_budget"] == "2s"
    assert not (out / ".warmup").exists()  # the throwaway step leaves nothing behind


def test_seeds_run_every_arm_once_per_seed_and_report_the_spread(tmp_path, c4_pretrain_args, capsys):
    base = _base(c4_pretrain_args)
    spec = _write(tmp_path / "spec.yaml", {"base": base, "budget": 3, "seeds": [0, 1], "arms": {"baseline": []}})
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "training arm baseline seed 0" in first and "training arm baseline seed 1" in first
    for seed in (0, 1):
        assert yaml.safe_load((out / "baseline" / f"seed-{seed}" / "config.yaml").read_text())["seed"] == seed
    before = _mtimes(out / "baseline")

    # Adding an arm and a seed trains only the new runs: the finished ones keep their records.
    _write(spec, {"base": base, "budget": 3, "seeds": [0, 1, 2], "arms": ARMS})
    assert main(["ablate", str(spec), "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("finished already") == 2
    assert "training arm baseline seed 2" in again and again.count("training arm squared_relu seed") == 3
    assert {p: t for p, t in _mtimes(out / "baseline").items() if p in before} == before

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2]
    rows = {r["arm"]: r for r in results["arms"]}
    assert list(rows) == ["baseline", "squared_relu"]
    for row in rows.values():
        assert row["seeds"] == [0, 1, 2] and row["finished"] and row["steps"] == 3
        assert [r["seed"] for r in row["runs"]] == [0, 1, 2]
        finals = row["final_eval_loss_per_seed"]
        assert finals == [r["final_eval_loss"] for r in row["runs"]] and all(map(math.isfinite, finals))
        assert len(set(finals)) == 3  # another seed: another init, data order and masking
        assert row["final_eval_loss"] == pytest.approx(sum(finals) / 3)
        assert row["final_eval_loss_spread"] == pytest.approx(max(finals) - min(finals))
        assert row["best_eval_loss"] == pytest.approx(sum(row["best_eval_loss_per_seed"]) / 3)
    # At one seed the arms share data and held-out batches; the seed is all that differs between runs.
    configs = {(arm, s): yaml.safe_load((out / arm / f"seed-{s}" / "config.yaml").read_text())
               for arm in ARMS for s in (0, 1, 2)}
    for s in (0, 1, 2):
        for key in ("data", "eval", "seed"):
            assert configs["baseline", s][key] == configs["squared_relu", s][key], key
    noise = results["seed_noise"]
    assert noise["arm"] == "baseline"
    assert noise["final_eval_loss_spread"] == rows["baseline"]["final_eval_loss_spread"] > 0
    table = (out / "results.md").read_text()
    assert "once per seed (0, 1, 2)" in table and "per seed (0 / 1 / 2)" in table and "Seed noise: baseline" in table
    line = next(line for line in table.splitlines() if line.startswith("| squared_relu |"))
    delta = rows["squared_relu"]["final_eval_loss"] - rows["baseline"]["final_eval_loss"]
    assert " / ".join(f"{v:.4f}" for v in rows["squared_relu"]["final_eval_loss_per_seed"]) in line
    paired = [a - b for a, b in zip(rows["squared_relu"]["final_eval_loss_per_seed"],
                                    rows["baseline"]["final_eval_loss_per_seed"])]
    assert f"{delta:+.4f} ({' / '.join(f'{d:+.4f}' for d in paired)})" in line
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same directory under a spec without seeds is refused, as is the converse.
    _write(spec, {"base": base, "budget": 3, "arms": ARMS})
    assert main(["ablate", str(spec), "--out", str(out)]) == 2
    assert "holds runs of a spec with seeds" in capsys.readouterr().err
    (tmp_path / "plain" / "baseline").mkdir(parents=True)
    (tmp_path / "plain" / "baseline" / "ablate-arm.json").write_text("{}")
    _write(spec, {"base": base, "budget": 3, "seeds": [0], "arms": ARMS})
    assert main(["ablate", str(spec), "--out", str(tmp_path / "plain")]) == 2
    assert "trained by a spec without seeds" in capsys.readouterr().err


BAD_SEEDS = [
    ({"seeds": []}, "seeds must be a non-empty list of seeds"),
    ({"seeds": 1}, "seeds must be a non-empty list of seeds"),
    ({"seeds": [0, "1"]}, "seeds must be a non-empty list of seeds"),
    ({"seeds": [-1]}, "seeds must be a non-empty list of seeds"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
]


@pytest.mark.parametrize("extra, message", BAD_SEEDS, ids=[repr(e["seeds"]) for e, _ in BAD_SEEDS])
def test_bad_seeds_are_refused(tmp_path, c4_pretrain_args, capsys, extra, message):
    path = _write(tmp_path / "spec.yaml", {"base": _base(c4_pretrain_args), "budget": 3, "arms": ARMS, **extra})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err


def test_base_seed_with_seeds_is_refused(tmp_path, c4_pretrain_args, capsys):
    path = _write(tmp_path / "spec.yaml", {"base": [*_base(c4_pretrain_args), "seed=3"], "budget": 3,
                                           "seeds": [0, 1], "arms": ARMS})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "base sets seed, and seeds: lists the seeds" in capsys.readouterr().err
