"""Fine-tuning data: generic seq2seq files (jsonl / csv / parquet, optionally .gz) and the batching.

A fine-tuning example is a source text and one or more reference targets (`Seq2SeqExample`); SNI
examples (data/instructions.py) are the same type with the Tk-Instruct prompt as source. Training
uses one reference per example (`rng.choice`, as Tk-Instruct's collator does); evaluation scores a
prediction against all of them (eval/metrics.py).

`collate_seq2seq` tokenizes a list of examples into padded tensors, `collate_packed` into packed
rows (several examples per row, data/packing.py). Over-long sequences are cut as
transformers' `truncation=True` does (the first `max_len - 1` tokens, then EOS) and are never
dropped; `log_truncation` counts them once at load time so the user sees how many were cut.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from t5forge.errors import T5ForgeError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Seq2SeqExample:
    id: str
    source: str
    references: tuple[str, ...]  # >= 1; training picks one, evaluation keeps all
    task: str = ""  # grouping key for per-task metrics ("" for plain seq2seq files)
    categories: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------- file reading
def _format_of(path: Path) -> tuple[str, bool]:
    """(suffix, gzipped) of a data file, e.g. ("jsonl", True) for train.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUPPORTED_SUFFIXES:
        raise T5ForgeError(
            f"{path}: unsupported seq2seq file type {''.join(path.suffixes) or '(none)'}; "
            f"use .jsonl, .csv or .parquet (optionally .gz)"
        )
    return suffix.lstrip("."), gzipped


def _rows(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, row-as-mapping) for every record; location is `file:line` for text formats."""
    fmt, gzipped = _format_of(path)
    opener = gzip.open if gzipped else open
    try:
        if fmt in ("jsonl", "json"):
            with opener(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}:{line_no}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise T5ForgeError(
                            f"{path}:{line_no}: not valid JSON ({e.msg}); expected one object per line"
                        ) from None
        elif fmt == "csv":
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                # Line numbers count the header as line 1; csv may span a record over several lines.
                for row in reader:
                    yield f"{path}:{reader.line_num}", row
        else:  # parquet
            import pyarrow.parquet as pq

            data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
            try:
                table = pq.read_table(io.BytesIO(data))
            except Exception as e:  # pyarrow raises several types for a broken file
                raise T5ForgeError(f"{path}: cannot read as parquet ({e})") from None
            for i, row in enumerate(table.to_pylist()):
                yield f"{path} row {i}", row
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise T5ForgeError(f"{path}: cannot read ({e})") from None


def _as_references(value: Any, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise T5ForgeError(
        f"{where}: target field {field!r} must be a string or a non-empty list of strings, got {value!r}"
    )


def read_seq2seq_file(
    path,
    *,
    input_field: str = "input",
    target_field: str = "target",
    id_field: str | None = None,
    task_field: str | None = None,
) -> list[Seq2SeqExample]:
    """All records of one jsonl/csv/parquet file (optionally .gz) as examples, in file order."""
    path = Path(path)
    if not path.is_file():
        raise T5ForgeError(f"seq2seq data file not found: {path}")
    examples = []
    for i, (where, row) in enumerate(_rows(path)):
        if not isinstance(row, Mapping):
            raise T5ForgeError(f"{where}: expected a JSON object with fields {input_field!r} and {target_field!r}")
        for field in (input_field, target_field, id_field, task_field):
            if field is not None and row.get(field) is None:
                have = ", ".join(map(repr, row)) or "none"
                raise T5ForgeError(
                    f"{where}: missing field {field!r} (fields present: {have}); set the field names to match the file"
                )
        source = row[input_field]
        if not isinstance(source, str):
            raise T5ForgeError(f"{where}: input field {input_field!r} must be a string, got {type(source).__name__}")
        examples.append(
            Seq2SeqExample(
                id=str(row[id_field]) if id_field else f"{path.name}:{i}",
                source=source,
                references=_as_references(row[target_field], where, target_field),
                task=str(row[task_field]) if task_field else "",
            )
        )
    if not examples:
        raise T5ForgeError(
            f"{path}: no records; a seq2seq file needs at least one {input_field!r}/{target_field!r} record"
        )
    return examples


def load_seq2seq_files(
    files: Sequence,
    *,
    input_field: str = "input",
    target_field: str = "target",
    id_field: str | None = None,
    task_field: str | None = None,
    tokenizer=None,
    max_source_length: int = 1024,
    max_target_length: int = 128,
    name: str = "seq2seq",
) -> list[Seq2SeqExample]:
    """Examples of several files, concatenated; with a tokenizer, the truncation counts are logged."""
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise T5ForgeError(f"{name}: no data files given")
    examples = []
    for f in files:
        examples += read_seq2seq_file(
            f, input_field=input_field, target_field=target_field, id_field=id_field, task_field=task_field
        )
    if tokenizer is not None:
        log_truncation(examples, tokenizer, max_source_length, max_target_length, name=name)
    return examples


# ---------------------------------------------------------------------------------- truncation
def count_truncated(texts: Sequence[str], tokenizer, max_length: int) -> int:
    """How many texts encode (with EOS) to more than `max_length` tokens."""
    return sum(len(ids) > max_length for ids in tokenizer.encode_batch(list(texts)))


def log_truncation(examples, tokenizer, max_source_length, max_target_length, *, name, long_sources=None) -> dict:
    """Count (and log in one line) sources and references longer than the limits; returns the counts.

    `long_sources` lets a caller that already tokenized the full sources (SNI) pass its own count.
    """
    if long_sources is None:
        long_sources = count_truncated([e.source for e in examples], tokenizer, max_source_length)
    refs = [r for e in examples for r in e.references]
    if refs and not any(r.strip() for r in refs):
        import warnings

        # Every target is just EOS: the model learns to stop at once, and the loss says nothing.
        warnings.warn(f"{name}: every target of the {len(examples)} examples is empty; check the target field")
    long_targets = count_truncated(refs, tokenizer, max_target_length)
    logger.info(
        "%s: %d examples; %d sources longer than %d tokens and %d of %d targets longer than %d tokens "
        "are truncated (kept, not dropped)",
        name, len(examples), long_sources, max_source_length, long_targets, len(refs), max_target_length,
    )
    return {
        "examples": len(examples),
        "long_sources": long_sources,
        "references": len(refs),
        "long_targets": long_targets,
    }


# ---------------------------------------------------------------------------------- batching
def _truncate(ids: list[int], max_length: int, eos_id: int) -> list[int]:
    # transformers' `truncation=True` keeps room for the EOS it appends; we do the same.
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [eos_id]


def _source_and_references(example) -> tuple[str, Sequence[str]]:
    if isinstance(example, Seq2SeqExample):
        return example.source, example.references
    if isinstance(example, Mapping) and "source" in example and ("target" in example or "references" in example):
        refs = example["references"] if "references" in example else example["target"]
        return example["source"], [refs] if isinstance(refs, str) else refs
    raise TypeError(f"collate_seq2seq needs Seq2SeqExample or dict(source=, target=|references=), got {example!r}")


def _pad(rows: list[list[int]], value: int, multiple: int | None):
    import torch

    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def tokenize_seq2seq(examples: Sequence, tokenizer, max_source_length: int, max_target_length: int,
                     rng: random.Random | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(source ids, target ids) of a batch, truncated, EOS included: what padded and packed batches share.

    With several references per example, `rng.choice` picks the training target (Tk-Instruct draws
    with `random.choice` per batch); without rng the first one.
    """
    if not examples:
        raise ValueError("collate_seq2seq got an empty batch")
    sources, targets = [], []
    for ex in examples:
        source, refs = _source_and_references(ex)
        sources.append(source)
        targets.append(rng.choice(list(refs)) if rng is not None else refs[0])
    eos = tokenizer.eos_id
    source_ids = [_truncate(ids, max_source_length, eos) for ids in tokenizer.encode_batch(sources)]
    target_ids = [_truncate(ids, max_target_length, eos) for ids in tokenizer.encode_batch(targets)]
    return source_ids, target_ids


def collate_seq2seq(
    examples: Sequence,
    tokenizer,
    max_source_length: int,
    max_target_length: int,
    pad_to_multiple_of: int | None = None,
    rng: random.Random | None = None,
) -> dict:
    """Tokenize and pad a batch: dict(input_ids, attention_mask, labels) as LongTensors.

    input_ids are padded with the pad id (0) and attention_mask marks real tokens; labels are padded
    with -100 so the loss ignores them. `rng`: see tokenize_seq2seq.
    """
    source_ids, target_ids = tokenize_seq2seq(examples, tokenizer, max_source_length, max_target_length, rng)
    input_ids = _pad(source_ids, tokenizer.pad_id, pad_to_multiple_of)
    attention_mask = _pad([[1] * len(r) for r in source_ids], 0, pad_to_multiple_of)
    labels = _pad(target_ids, -100, pad_to_multiple_of)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(
    examples: Sequence,
    tokenizer,
    max_source_length: int,
    max_target_length: int,
    source_capacity: int | None = None,
    target_capacity: int | None = None,
    pad_to_multiple_of: int | None = None,
    rng: random.Random | None = None,
) -> dict:
    """The same examples and token ids as collate_seq2seq, packed several to a row (data/packing.py):
    dict(input_ids, encoder_segment_ids, labels, decoder_segment_ids). A row's capacity is the
    batch's longest example, or the given capacity when that is larger. At the batch's longest no
    row is wider than the padded batch's, so even dense attention (cost ~ rows x width^2) never
    costs more than padded; a capacity of the whole batch gives one row (data/packing.py)."""
    from t5forge.data.packing import pack_seq2seq

    source_ids, target_ids = tokenize_seq2seq(examples, tokenizer, max_source_length, max_target_length, rng)
    return pack_seq2seq(source_ids, target_ids, source_capacity=max(source_capacity or 0, *map(len, source_ids)),
                        target_capacity=max(target_capacity or 0, *map(len, target_ids)), pad_id=tokenizer.pad_id,
                        pad_to_multiple_of=pad_to_multiple_of)
