"""Text sources for pre-training: a Hub dataset or local files, streamed through `datasets`.

One code path: `datasets.load_dataset(..., streaming=True)` for `allenai/c4` (or any Hub/local
dataset folder with a config) and for local files (the `text`, `json` and `parquet` builders;
`.gz` is decompressed on the fly). A source is a list of shards (one per file); readers -- one per
(data-parallel rank, dataloader worker) -- split the work without overlap:
- at least as many shards as readers: reader g takes shards g, g + G, g + 2G, ...;
- fewer shards (one small file): every reader walks all shards and keeps records g, g + G, ...

Problems in the user's files are found as `datasets` reads them, then pinned to a file and line by
rescanning that one file, and raised as one T5ForgeError.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from t5forge.errors import T5ForgeError

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
DECODE_ERROR_MODES = ("raise", "skip")
# The config keys (pretrain, data preview) that read local files instead of a Hub dataset.
LOCAL_FILES_ADVICE = "data.train_files=[PATH/train.jsonl.gz] data.validation_files=[PATH/valid.jsonl.gz]"
REPLACEMENT_CHAR = "\ufffd"


def _builder_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    return BUILDERS.get(suffixes[0].lower()) if suffixes else None


def resolve_files(specs) -> list[Path]:
    """Files, directories (searched recursively) and globs -> existing, non-empty files, sorted per spec."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: list[Path] = []
    for spec in specs:
        spec = str(spec)
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise T5ForgeError(f"no file matches {spec!r}")
            found += matches
        elif Path(spec).is_dir():
            matches = sorted(
                p for p in Path(spec).rglob("*")
                if p.is_file() and _builder_of(p) and not any(part.startswith(".") for part in p.relative_to(spec).parts)
            )  # hidden folders (.cache, .git) hold metadata, not text
            if not matches:
                raise T5ForgeError(
                    f"directory {spec} holds no .txt, .json, .jsonl or .parquet files (optionally .gz)"
                )
            found += matches
        elif Path(spec).is_file():
            found.append(Path(spec))
        else:
            raise T5ForgeError(f"data file {spec} does not exist")
    for path in found:
        if _builder_of(path) is None:
            raise T5ForgeError(
                f"{path}: unknown format; use .txt (one document per line), .json/.jsonl (one record per line) "
                "or .parquet, optionally compressed as .gz/.bz2/.xz"
            )
        if path.stat().st_size == 0:
            raise T5ForgeError(f"data file {path} is empty")
    builders = {_builder_of(p) for p in found}
    if len(builders) > 1:
        raise T5ForgeError(f"data files mix formats ({', '.join(sorted(builders))}); give one format at a time")
    if not found:
        raise T5ForgeError("no data files given")
    return found


@dataclass(frozen=True)
class ReaderSlice:
    """Which part of the source one reader (rank, worker) reads: `shards`, and records g mod G in them."""

    shards: tuple[int, ...]
    record_modulus: int  # 1: every record of my shards
    record_offset: int

    def keeps(self, record_index: int) -> bool:
        return record_index % self.record_modulus == self.record_offset


def reader_slice(num_shards: int, reader: int, num_readers: int) -> ReaderSlice:
    if num_shards >= num_readers:
        return ReaderSlice(tuple(range(reader, num_shards, num_readers)), 1, 0)
    return ReaderSlice(tuple(range(num_shards)), num_readers, reader)


class TextSource:
    """The documents of one split, as shards of text; picklable, so dataloader workers can read it."""

    def __init__(
        self,
        *,
        dataset: str | None = None,
        dataset_config: str | None = None,
        files=(),
        split: str = "train",
        text_field: str = "text",
        on_decode_error: str = "raise",
        skip_option: str | None = None,
    ):
        """`skip_option`: how the calling command turns on skipping undecodable records (named in the
        error's advice), or None when it cannot skip."""
        if on_decode_error not in DECODE_ERROR_MODES:
            raise T5ForgeError(f"on_decode_error must be one of {DECODE_ERROR_MODES}, got {on_decode_error!r}")
        self.files = resolve_files(files) if files else []
        if not self.files and not dataset:
            raise T5ForgeError("no data: give local files (data.train_files=[...]) or a dataset name (data.dataset)")
        self.dataset, self.dataset_config, self.split = dataset, dataset_config, split
        self.text_field, self.on_decode_error = text_field, on_decode_error
        self.skip_option = skip_option
        self.num_shards = None  # known once loaded
        self._ds = self._load()
        self.num_shards = self._ds.n_shards
        self.skipped_undecodable = 0  # records dropped under on_decode_error="skip" (per process)

    def __repr__(self) -> str:
        where = f"{len(self.files)} local file(s)" if self.files else f"{self.dataset} ({self.dataset_config})"
        return f"TextSource({where}, split={self.split!r}, shards={self.num_shards})"

    def fingerprint(self) -> dict:
        """What the data position refers to: each local file's (path, size, mtime_ns), or the Hub
        dataset's name, config and split."""
        if self.files:
            return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}
        return {"dataset": self.dataset, "config": self.dataset_config, "split": self.split}

    def _load(self):
        import datasets

        skip = self.on_decode_error == "skip"
        if self.files:
            builder = _builder_of(self.files[0])
            kwargs = {}
            if skip and builder == "text":
                kwargs = {"encoding_errors": "replace"}
            elif skip and builder == "json":
                # datasets decodes with `encoding_errors` only when the encoding is not spelled "utf-8"
                kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
            load = dict(path=builder, data_files=[str(f) for f in self.files], split="train", **kwargs)
        else:
            if not Path(self.dataset).expanduser().exists():  # a Hub id, not a local dataset folder
                from t5forge.hub import require_hub

                require_hub(f"dataset {self.dataset!r}", self._offline_advice())
            load = dict(path=self.dataset, name=self.dataset_config, split=self.split)
        try:
            ds = datasets.load_dataset(streaming=True, **load)
        except Exception as err:  # network, missing repo or config, unreadable first file
            raise self._load_error(err) from None
        if ds.features is not None:
            if self.text_field not in ds.features:
                raise (self._diagnose(0, None) if self.files else None) or T5ForgeError(
                    f"{self._name()} has no field {self.text_field!r} (fields: {', '.join(ds.features)}); "
                    "set data.text_field"
                )
            ds = ds.select_columns([self.text_field])
        return ds

    def _load_error(self, err: Exception) -> T5ForgeError:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if self.files:
            located = self._diagnose(0, err)
            return located or T5ForgeError(f"could not read {self.files[0]} ({reason})")
        return T5ForgeError(
            f"could not open dataset {self.dataset!r} (config {self.dataset_config!r}, split {self.split!r}) "
            f"from the Hugging Face Hub ({reason}); {self._offline_advice()}"
        )

    def _offline_advice(self) -> str:
        return f"read local files instead: {LOCAL_FILES_ADVICE} (json/jsonl/parquet/txt, optionally .gz)"

    def _name(self, shard: int | None = None) -> str:
        if self.files:
            if shard is not None and self.num_shards == len(self.files):
                return str(self.files[shard])
            return ", ".join(map(str, self.files[:3])) + (" ..." if len(self.files) > 3 else "")
        at = f" shard {shard}" if shard is not None else ""
        return f"dataset {self.dataset} ({self.dataset_config}, {self.split}){at}"

    def texts(self, shard: int, start: int = 0) -> Iterator[str]:
        """The texts of one shard from record `start` on; empty documents come out as ''."""
        records = self._ds.shard(num_shards=self.num_shards, index=shard)
        index = 0
        try:
            # `.iter` (unlike plain iteration) does not split the data again by DataLoader worker:
            # the readers already have their own slices
            for batch in records.iter(batch_size=256):
                for text in batch.get(self.text_field, ()):
                    if index >= start:
                        if not isinstance(text, str):
                            raise self._diagnose(shard, None) or T5ForgeError(
                                f"{self._name(shard)}: record {index} has no text in field {self.text_field!r} "
                                f"(got {type(text).__name__}); set data.text_field"
                            )
                        if self.on_decode_error == "skip" and REPLACEMENT_CHAR in text:
                            self.skipped_undecodable += 1
                            text = ""
                        yield text
                    index += 1
        except (ValueError, OSError, EOFError) as err:  # UnicodeDecodeError, ArrowInvalid, bad gzip
            raise self._diagnose(shard, err) or T5ForgeError(
                f"could not read {self._name(shard)} after record {index} ({type(err).__name__}: {err})"
            ) from None

    # ------------------------------------------------------------------ locating bad input
    def _diagnose(self, shard: int, err: Exception | None) -> T5ForgeError | None:
        """Rescan the shard's file to name the first bad line (only for local, line-based files)."""
        if not self.files or self.num_shards not in (None, len(self.files)):
            return None  # shards are not files: no line to point at
        path = self.files[shard]
        builder = _builder_of(path)
        if builder not in ("text", "json"):
            return None
        opener = COMPRESSED.get(path.suffix, open)
        try:
            with opener(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    problem = self._line_problem(raw, builder)
                    if problem:
                        return T5ForgeError(f"{path}:{number}: {problem}")
        except (OSError, EOFError) as scan_err:
            return T5ForgeError(f"{path}: cannot be read ({scan_err}); is it a complete, valid file?")
        return None

    def _line_problem(self, raw: bytes, builder: str) -> str | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.on_decode_error == "skip":
                return None
            skip = f", or skip such records and count them with {self.skip_option}" if self.skip_option else ""
            return (
                f"bytes that are not UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8 "
                f"(e.g. iconv -f latin1 -t utf-8){skip}"
            )
        if builder == "text" or not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
        if not isinstance(record, dict):
            return f"a JSON {type(record).__name__} where an object with a {self.text_field!r} field was expected"
        if self.text_field in record and not isinstance(record[self.text_field], str):
            value = record[self.text_field]
            kind = "null" if value is None else f"a JSON {_json_kind(value)}"
            return f"field {self.text_field!r} holds {kind}, not a string; make it the record's text or set data.text_field"
        if not isinstance(record.get(self.text_field), str):
            fields = ", ".join(record) or "none"
            return f"record has no text field {self.text_field!r} (its fields: {fields}); set data.text_field"
        return None


def _json_kind(value) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def fingerprint_difference(saved: dict, now: dict) -> str:
    """'' when equal, else the differences as one line: "shard added: X; size changed: Y (A -> B bytes)"."""
    if saved == now:
        return ""
    if "files" not in saved or "files" not in now:
        describe = lambda f: ", ".join(f"{k} {v}" for k, v in f.items()) if "files" not in f else f"{len(f['files'])} local file(s)"  # noqa: E731
        return f"data source changed: {describe(saved)} -> {describe(now)}"
    before = {name: (size, mtime) for name, size, mtime in saved["files"]}
    after = {name: (size, mtime) for name, size, mtime in now["files"]}
    diffs = [f"shard added: {n}" for n in after if n not in before]
    diffs += [f"shard removed: {n}" for n in before if n not in after]
    for name in before.keys() & after.keys():
        (size0, mtime0), (size1, mtime1) = before[name], after[name]
        if size0 != size1:
            diffs.append(f"size changed: {name} ({size0} -> {size1} bytes)")
        elif mtime0 != mtime1:
            diffs.append(f"modified: {name} (same size, new modification time)")
    if not diffs and list(before) != list(after):
        diffs.append("the files are in another order")
    return "; ".join(sorted(diffs, key=lambda d: (d.split(":")[0], d)))
