"""SNI reading: split sizes, per-task caps, Tk-Instruct's instance selection, truncation counts."""

import json
import logging
import random

import pytest

from t5forge.data.instructions import load_sni, read_sni_instances


def _raw_split(sni_dir, split):
    names = [l.strip() for l in (sni_dir / "splits" / "default" / f"{split}_tasks.txt").read_text().splitlines() if l.strip()]
    return {n: json.loads((sni_dir / "tasks" / f"{n}.json").read_text()) for n in names}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("cap", [100, 30, 5])
def test_counts_follow_split_files_and_cap(sni_dir, split, cap):
    raw = _raw_split(sni_dir, split)
    expected = {}
    for name, task in raw.items():
        available = len(task["Instances"]) if split == "train" else min(100, len(task["Instances"]))
        expected[name] = min(cap, available)
    rows = read_sni_instances(sni_dir, split, max_num_instances_per_task=cap)
    got = {}
    for name, _, _ in rows:
        got[name] = got.get(name, 0) + 1
    assert got == expected
    ids = [inst["id"] for _, _, inst in rows]
    assert len(set(ids)) == len(ids)
    for name, _, inst in rows:  # every selected instance is a real instance of its task
        assert inst in raw[name]["Instances"]


def test_subset_totals(sni_dir):
    # The shared subset: 4 train tasks / 200 instances, 5 test tasks / 238 instances (all < 100 per task).
    assert len(read_sni_instances(sni_dir, "train")) == 200
    assert len(read_sni_instances(sni_dir, "test")) == 238


def test_selection_is_tk_instruct_shuffle(sni_dir):
    # Tk-Instruct: set_seed(seed), then per task in split order `random.shuffle(instances)[:cap]`.
    raw = _raw_split(sni_dir, "train")
    rng = random.Random(7)
    expected = []
    for task in raw.values():
        inst = list(task["Instances"])
        rng.shuffle(inst)
        expected += [i["id"] for i in inst[:10]]
    got = [inst["id"] for _, _, inst in read_sni_instances(sni_dir, "train", max_num_instances_per_task=10, seed=7)]
    assert got == expected
    other = [inst["id"] for _, _, inst in read_sni_instances(sni_dir, "train", max_num_instances_per_task=10, seed=8)]
    assert other != got


def test_test_split_uses_first_100_only(sni_dir, tmp_path):
    # A test task with 130 instances contributes only its first 100 (the official evaluation set).
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    task = json.loads((sni_dir / "tasks" / "task1146_country_capital.json").read_text())
    task["Instances"] = task["Instances"] + [dict(i, id=i["id"] + "-x") for i in task["Instances"][:51]]
    assert len(task["Instances"]) == 130
    (tmp_path / "tasks" / "big.json").write_text(json.dumps(task))
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("big\n")
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("big\n")
    test_ids = {i["id"] for _, _, i in read_sni_instances(tmp_path, "test", max_num_instances_per_task=None)}
    assert test_ids == {i["id"] for i in task["Instances"][:100]}
    assert len(read_sni_instances(tmp_path, "train", max_num_instances_per_task=None)) == 130
    assert len(read_sni_instances(tmp_path, "train", max_num_instances_per_task=100)) == 100


def test_examples_keep_task_categories_and_all_references(sni_dir, t5_tokenizer):
    raw = _raw_split(sni_dir, "test")
    examples = load_sni(sni_dir, "test", t5_tokenizer)
    assert len(examples) == 238
    by_id = {i["id"]: (n, t, i) for n, t in raw.items() for i in t["Instances"]}
    for e in examples:
        name, task, inst = by_id[e.id]
        assert e.task == name
        assert list(e.categories) == task["Categories"]
        assert list(e.references) == inst["output"]
        assert e.source.endswith("\nOutput: ")
    assert any(len(e.references) == 3 for e in examples)  # task102 has 3 references each


def test_truncation_is_counted_not_dropped(sni_dir, t5_tokenizer, caplog):
    raw = _raw_split(sni_dir, "test")
    refs = [o for t in raw.values() for i in t["Instances"][:100] for o in i["output"]]
    long_refs = sum(len(t5_tokenizer.encode(r)) > 4 for r in refs)
    assert 0 < long_refs < len(refs)
    with caplog.at_level(logging.INFO):
        examples = load_sni(sni_dir, "test", t5_tokenizer, max_source_length=16, max_target_length=4)
    assert len(examples) == 238  # nothing dropped
    # every definition alone is longer than 16 tokens: every prompt is cut, and keeps no positive example
    assert "238 sources longer than 16 tokens" in caplog.text
    assert f"{long_refs} of {len(refs)} targets longer than 4 tokens" in caplog.text
    assert "238 prompts kept fewer positive examples" in caplog.text
    for e in examples:
        assert len(t5_tokenizer.encode(e.source, add_eos=False)) <= 16
        assert e.source.startswith("Definition:")
