"""Broken SNI data: each case is one T5ForgeError naming the file (and the instance id)."""

import json
import logging
import shutil

import pytest

from t5forge.data.instructions import load_sni, read_sni_instances
from t5forge.errors import T5ForgeError

TASK = "task1146_country_capital"


@pytest.fixture
def sni_copy(sni_dir, tmp_path):
    """A one-task SNI folder whose task file a test may break."""
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    shutil.copy(sni_dir / "tasks" / f"{TASK}.json", tmp_path / "tasks")
    for split in ("train", "test"):
        (tmp_path / "splits" / "default" / f"{split}_tasks.txt").write_text(TASK + "\n")
    return tmp_path


def _edit(root, change):
    path = root / "tasks" / f"{TASK}.json"
    task = json.loads(path.read_text())
    change(task)
    path.write_text(json.dumps(task))
    return path


def test_the_copy_reads(sni_copy):
    assert len(read_sni_instances(sni_copy, "train")) == 79


def test_task_without_instances(sni_copy):
    path = _edit(sni_copy, lambda t: t.update(Instances=[]))
    with pytest.raises(T5ForgeError, match="has no instances") as e:
        read_sni_instances(sni_copy, "train")
    assert str(path) in str(e.value)
    _edit(sni_copy, lambda t: t.pop("Instances"))
    with pytest.raises(T5ForgeError, match="has no instances"):
        read_sni_instances(sni_copy, "train")


@pytest.mark.parametrize("definition", [None, [], [""], ["   "]])
def test_task_without_definition(sni_copy, definition):
    def change(t):
        if definition is None:
            t.pop("Definition")
        else:
            t["Definition"] = definition

    path = _edit(sni_copy, change)
    with pytest.raises(T5ForgeError, match="has no definition") as e:
        read_sni_instances(sni_copy, "test")
    assert str(path) in str(e.value)


def test_instance_with_empty_output_list(sni_copy):
    def change(t):
        t["Instances"][5]["output"] = []

    path = _edit(sni_copy, change)
    bad_id = json.loads(path.read_text())["Instances"][5]["id"]
    with pytest.raises(T5ForgeError, match="empty output list") as e:
        read_sni_instances(sni_copy, "train")
    assert str(path) in str(e.value) and bad_id in str(e.value)


def test_missing_split_file(sni_copy):
    (sni_copy / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(T5ForgeError, match="split file not found") as e:
        read_sni_instances(sni_copy, "test")
    assert "test_tasks.txt" in str(e.value)


def test_task_in_split_file_without_json(sni_copy):
    split = sni_copy / "splits" / "default" / "train_tasks.txt"
    split.write_text(f"{TASK}\ntask9999_missing\n")
    with pytest.raises(T5ForgeError, match="task9999_missing") as e:
        read_sni_instances(sni_copy, "train")
    assert str(split) in str(e.value) and "task9999_missing.json" in str(e.value)


def test_missing_task_folder_and_bad_split_name(sni_copy):
    with pytest.raises(T5ForgeError, match="task folder not found"):
        read_sni_instances(sni_copy / "nowhere", "train")
    with pytest.raises(T5ForgeError, match="split must be one of"):
        read_sni_instances(sni_copy, "validation")


def test_broken_json(sni_copy):
    path = sni_copy / "tasks" / f"{TASK}.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(T5ForgeError, match="not valid JSON") as e:
        read_sni_instances(sni_copy, "train")
    assert str(path) in str(e.value)


def test_non_english_task_is_reported_not_used(sni_copy, sni_dir, caplog):
    shutil.copy(sni_dir / "tasks" / "task363_sst2_polarity_classification.json", sni_copy / "tasks")
    (sni_copy / "splits" / "default" / "train_tasks.txt").write_text(f"{TASK}\ntask363_sst2_polarity_classification\n")
    path = sni_copy / "tasks" / "task363_sst2_polarity_classification.json"
    task = json.loads(path.read_text())
    task["Output_language"] = ["Spanish"]
    path.write_text(json.dumps(task))
    with caplog.at_level(logging.WARNING):
        rows = read_sni_instances(sni_copy, "train")
    assert {name for name, _, _ in rows} == {TASK}
    assert "1 non-English task(s)" in caplog.text and "task363_sst2_polarity_classification" in caplog.text
    assert len(read_sni_instances(sni_copy, "train", english_only=False)) == 79 + 54


def test_cli_style_message_is_one_line(sni_copy, t5_tokenizer):
    _edit(sni_copy, lambda t: t.update(Instances=[]))
    with pytest.raises(T5ForgeError) as e:
        load_sni(sni_copy, "train", t5_tokenizer)
    assert "\n" not in str(e.value)
