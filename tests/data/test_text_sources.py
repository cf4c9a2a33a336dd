"""Local text sources in every supported format, and each kind of bad input as one clear T5ForgeError."""

import gzip
import itertools
import json

import pytest

from t5forge.data.loader import build_pretrain_loader
from t5forge.data.sources import TextSource
from t5forge.errors import T5ForgeError


def _all_texts(source):
    return [t for shard in range(source.num_shards) for t in source.texts(shard) if t]


@pytest.fixture()
def docs(c4_docs):
    return [d.replace("\n", " ") for d in c4_docs[:30]]  # one document per line for .txt


def test_formats_files_directories_and_globs(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("\n".join(docs[:10]) + "\n\n")  # trailing blank line: no document
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n".join(docs[10:20]) + "\n")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "c.jsonl").write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"content": docs[:7]}), tmp_path / "d.parquet")

    assert _all_texts(TextSource(files=[tmp_path / "a.txt"])) == docs[:10]
    assert _all_texts(TextSource(files=[str(tmp_path / "*.txt*")])) == docs[:20]
    assert _all_texts(TextSource(files=[tmp_path / "j"], text_field="body")) == docs
    assert _all_texts(TextSource(files=[tmp_path / "d.parquet"], text_field="content")) == docs[:7]


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(T5ForgeError, match="does not exist"):
        TextSource(files=[tmp_path / "nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(T5ForgeError, match="empty.jsonl is empty"):
        TextSource(files=[tmp_path / "empty.jsonl"])
    (tmp_path / "doc.pdf").write_text("x")
    with pytest.raises(T5ForgeError, match="unknown format"):
        TextSource(files=[tmp_path / "doc.pdf"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(T5ForgeError, match="holds no .txt, .json"):
        TextSource(files=[tmp_path / "sub"])
    with pytest.raises(T5ForgeError, match="no file matches"):
        TextSource(files=[str(tmp_path / "*.parquet")])
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(T5ForgeError, match="mix formats"):
        TextSource(files=[tmp_path / "a.txt", tmp_path / "b.jsonl"])


def test_json_record_without_the_text_field_names_file_and_line(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in docs[:5]] + [json.dumps({"content": "no text here"})] + [json.dumps({"text": docs[6]})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(T5ForgeError, match=r"c.jsonl:6: record has no text field 'text' \(its fields: content\)"):
        _all_texts(TextSource(files=[path]))
    # the field is there but holds no string
    for value, kind in [(7, "a JSON number"), (None, "null"), (["a", "b"], "a JSON list")]:
        path.write_text("\n".join(lines[:2] + [json.dumps({"text": value, "id": 3})]) + "\n")
        with pytest.raises(T5ForgeError, match=rf"c.jsonl:3: field 'text' holds {kind}, not a string"):
            _all_texts(TextSource(files=[path]))
    # no record has the field at all
    path.write_text(json.dumps({"content": "a"}) + "\n")
    with pytest.raises(T5ForgeError, match=r"c.jsonl:1: record has no text field 'text'"):
        TextSource(files=[path])


def test_broken_json_and_truncated_gzip(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": docs[0]}) + "\n" + '{"text": "unterminated\n' + json.dumps({"text": "z"}) + "\n")
    with pytest.raises(T5ForgeError, match=r"c.jsonl:2: invalid JSON"):
        _all_texts(TextSource(files=[path]))
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(T5ForgeError, match=r"cut.jsonl.gz"):
        _all_texts(TextSource(files=[tmp_path / "cut.jsonl.gz"]))


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_undecodable_bytes_name_file_and_line_or_are_skipped_and_counted(tmp_path, docs, fmt):
    good = [d.encode() for d in docs[:4]]
    bad = b"caf\xe9 au lait, latin-1 bytes"
    if fmt == "jsonl":
        good = [b'{"text": "' + g.replace(b'"', b"'").replace(b"\\", b"/") + b'"}' for g in good]
        bad = b'{"text": "' + bad + b'"}'
    path = tmp_path / f"mixed.{fmt}"
    path.write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    with pytest.raises(T5ForgeError, match=rf"mixed.{fmt}:3: bytes that are not UTF-8.*re-encode the file as UTF-8") as err:
        _all_texts(TextSource(files=[path]))
    assert "skip" not in str(err.value)  # a caller that cannot skip does not advise it
    with pytest.raises(T5ForgeError, match=r"UTF-8.*count them with --on-decode-error skip$"):
        _all_texts(TextSource(files=[path], skip_option="--on-decode-error skip"))
    source = TextSource(files=[path], on_decode_error="skip")
    texts = _all_texts(source)
    assert len(texts) == 4 and source.skipped_undecodable == 1


def test_corpus_with_no_text(tmp_path, t5_tokenizer):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[tmp_path / "blank.txt"], batch_size=2)
    with pytest.raises(T5ForgeError, match="found no text in a whole pass"):
        next(iter(loader))
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[tmp_path / "blank.txt"], batch_size=2, num_workers=2)
    with pytest.raises(T5ForgeError, match="found no text in a whole pass"):
        list(itertools.islice(loader, 1))


def test_held_out_data_smaller_than_a_batch(tmp_path, t5_tokenizer, docs):
    (tmp_path / "v.txt").write_text(docs[0] + "\n")
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[tmp_path / "v.txt"], split="validation", batch_size=64)
    with pytest.raises(T5ForgeError, match="too small for one batch of 64"):
        list(loader)
