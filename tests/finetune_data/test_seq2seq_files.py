"""Generic seq2seq files: jsonl / csv / parquet, plain or gzipped, and their bad-input errors."""

import csv
import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5forge.data.seq2seq import Seq2SeqExample, load_seq2seq_files, read_seq2seq_file
from t5forge.errors import T5ForgeError

ROWS = [
    {"question": "Translate to German: Hello world", "answer": "Hallo Welt", "uid": "a1"},
    {"question": "What is 2 + 2?", "answer": "4", "uid": "a2"},
    {"question": 'Quote: "x, y"\nnext line', "answer": "ok, fine", "uid": "a3"},
]


def _write(path, rows):
    name = path.name
    opener = gzip.open if name.endswith(".gz") else open
    if ".jsonl" in name:
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif ".csv" in name:
        with opener(path, "wt", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix("") if name.endswith(".gz") else path)
        if name.endswith(".gz"):
            raw = path.with_suffix("").read_bytes()
            path.write_bytes(gzip.compress(raw))
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.csv", "d.csv.gz", "d.parquet", "d.parquet.gz"])
def test_formats_read_the_same(tmp_path, name):
    path = _write(tmp_path / name, ROWS)
    got = read_seq2seq_file(path, input_field="question", target_field="answer", id_field="uid")
    assert got == [Seq2SeqExample(id=r["uid"], source=r["question"], references=(r["answer"],)) for r in ROWS]


def test_default_ids_task_field_and_reference_lists(tmp_path):
    rows = [{"input": "a", "target": ["x", "y"], "task": "t1"}, {"input": "b", "target": "z", "task": "t2"}]
    path = _write(tmp_path / "m.jsonl", rows)
    got = read_seq2seq_file(path, task_field="task")
    assert [e.id for e in got] == ["m.jsonl:0", "m.jsonl:1"]
    assert [e.references for e in got] == [("x", "y"), ("z",)]
    assert [e.task for e in got] == ["t1", "t2"]
    pq_path = _write(tmp_path / "m.parquet", [{"input": "a", "target": ["x", "y"]}])
    assert read_seq2seq_file(pq_path)[0].references == ("x", "y")


def test_several_files_and_truncation_log(tmp_path, t5_tokenizer, caplog):
    a = _write(tmp_path / "a.jsonl", ROWS)
    b = _write(tmp_path / "b.csv", ROWS[:2])
    long_sources = sum(len(t5_tokenizer.encode(r["question"])) > 8 for r in ROWS + ROWS[:2])
    long_targets = sum(len(t5_tokenizer.encode(r["answer"])) > 2 for r in ROWS + ROWS[:2])
    assert 0 < long_sources < 5 and 0 < long_targets < 5
    with caplog.at_level(logging.INFO):
        got = load_seq2seq_files([a, b], input_field="question", target_field="answer", tokenizer=t5_tokenizer,
                                 max_source_length=8, max_target_length=2, name="my-train")
    assert len(got) == 5
    assert f"my-train: 5 examples; {long_sources} sources longer than 8 tokens and {long_targets} of 5 targets" in caplog.text


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "c"}\n')
    with pytest.raises(T5ForgeError, match=r"d\.jsonl:3: missing field 'target'"):
        read_seq2seq_file(path)
    csv_path = _write(tmp_path / "d.csv", [{"input": "a", "other": "b"}])
    with pytest.raises(T5ForgeError, match=r"d\.csv:2: missing field 'target'"):
        read_seq2seq_file(csv_path)
    pq_path = _write(tmp_path / "d.parquet", [{"input": "a", "other": "b"}])
    with pytest.raises(T5ForgeError, match=r"d\.parquet row 0: missing field 'target'"):
        read_seq2seq_file(pq_path)


def test_bad_files(tmp_path):
    with pytest.raises(T5ForgeError, match="not found"):
        read_seq2seq_file(tmp_path / "none.jsonl")
    txt = tmp_path / "d.txt"
    txt.write_text("x")
    with pytest.raises(T5ForgeError, match="unsupported seq2seq file type"):
        read_seq2seq_file(txt)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"input": "a", "target": "b"}\n{"input": \n')
    with pytest.raises(T5ForgeError, match=r"b\.jsonl:2: not valid JSON"):
        read_seq2seq_file(broken)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(T5ForgeError, match="no records"):
        read_seq2seq_file(empty)
    bad_target = tmp_path / "t.jsonl"
    bad_target.write_text('{"input": "a", "target": []}\n')
    with pytest.raises(T5ForgeError, match=r"t\.jsonl:1: target field 'target' must be"):
        read_seq2seq_file(bad_target)
    bad_input = tmp_path / "i.jsonl"
    bad_input.write_text('{"input": 3, "target": "x"}\n')
    with pytest.raises(T5ForgeError, match=r"i\.jsonl:1: input field 'input' must be a string"):
        read_seq2seq_file(bad_input)
    not_pq = tmp_path / "n.parquet"
    not_pq.write_text("hello")
    with pytest.raises(T5ForgeError, match="cannot read as parquet"):
        read_seq2seq_file(not_pq)
    not_gz = tmp_path / "n.jsonl.gz"
    not_gz.write_text("hello")
    with pytest.raises(T5ForgeError, match="cannot read"):
        read_seq2seq_file(not_gz)
    with pytest.raises(T5ForgeError, match="no data files"):
        load_seq2seq_files([])
