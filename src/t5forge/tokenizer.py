"""The tokenizer: T5's SentencePiece vocabulary plus sentinels, or any T5-layout `tokenizer.json`.

T5 ids: pad 0, eos 1, unk 2, then the SentencePiece pieces, then `num_sentinels` (100) sentinel
tokens counted down from the top: `<extra_id_0>` = vocab_size - 1 (32099 for T5's spiece.model),
`<extra_id_99>` = 32000. Raw sentencepiece does not know the sentinels; we append them exactly as
transformers' `T5Tokenizer(extra_ids=100)` does, so ids agree with every HF T5 checkpoint.

Added tokens (UL2's paradigm tokens `[NLU]`, `[NLG]`, `[S2S]`, see `with_added_tokens`) come after
the sentinels, so T5's 32,100 ids keep their meaning and the three take 32100..32102 (inside the
32,128 embedding rows T5 already has). They are special: text that spells one encodes to it, as in
transformers, and `save` lists them in `additional_special_tokens` after the sentinels, where both
`load_tokenizer` and transformers find them at the same ids.

Two back ends behind one class:
- a SentencePiece model file (`spiece.model`): encoded with the `sentencepiece` library, i.e. the
  same segmentation T5 itself used (transformers converts it to a `tokenizers` Unigram, which
  agrees on real text except for rare float-precision ties inside very long documents);
- a `tokenizer.json` (`tokenizers` library) with T5's id layout; sentinels are appended if absent.

`load_tokenizer(spec)` accepts either file, a directory holding one (spiece.model preferred), or a
Hub repo id. `Tokenizer.save(dir)` writes files that both `load_tokenizer(dir)` and
`transformers.AutoTokenizer.from_pretrained(dir)` load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from t5forge.errors import T5ForgeError

NUM_SENTINELS = 100  # T5's convention (transformers' `extra_ids`)
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Text that spells a special token is mapped to that token, as transformers does.
_SPECIAL_RE = re.compile(r"<extra_id_(\d+)>|</s>|<pad>|<unk>")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


class Tokenizer:
    """T5 tokenizer. Use `load_tokenizer`; the constructor takes an already-validated back end."""

    pad_id = 0
    eos_id = 1
    unk_id = 2

    def __init__(self, *, sp=None, hf=None, num_sentinels: int = NUM_SENTINELS, added_tokens=(), source: str = ""):
        assert (sp is None) != (hf is None)
        self._sp = sp  # sentencepiece.SentencePieceProcessor
        self._hf = hf  # tokenizers.Tokenizer (sentinels and added tokens already inside)
        self.num_sentinels = num_sentinels
        self.added_tokens = tuple(added_tokens)  # after the sentinels, in id order
        self.source = source
        # sentencepiece threads for encode_batch (-1: all cores); data workers set 1 to share the CPU fairly
        self.num_threads = -1
        if sp is not None:
            self._base_size = sp.get_piece_size()
            self.vocab_size = self._base_size + num_sentinels + len(self.added_tokens)
        else:
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self._base_size = self.vocab_size - num_sentinels - len(self.added_tokens)
        # one past <extra_id_0>: the sentinels are sentinel_end - 1 - i
        self.sentinel_end = self._base_size + num_sentinels
        names = [re.escape(t) for t in self.added_tokens]
        self._special_re = re.compile("|".join([_SPECIAL_RE.pattern, *names])) if names else _SPECIAL_RE

    def __repr__(self) -> str:
        added = f", added_tokens={list(self.added_tokens)}" if self.added_tokens else ""
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, num_sentinels={self.num_sentinels}{added})"

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ ids <-> text
    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise T5ForgeError(
                f"sentinel <extra_id_{i}> does not exist: this tokenizer has {self.num_sentinels} sentinels"
            )
        return self.sentinel_end - 1 - i

    def is_sentinel(self, i: int) -> bool:
        return self._base_size <= i < self.sentinel_end

    def added_token_id(self, token: str) -> int:
        if token not in self.added_tokens:
            raise T5ForgeError(f"{token} is not in the tokenizer {self.source} (added tokens: "
                               f"{', '.join(self.added_tokens) or 'none'})")
        return self.sentinel_end + self.added_tokens.index(token)

    def with_added_tokens(self, tokens) -> "Tokenizer":
        """This tokenizer with `tokens` among its added tokens (after the sentinels): itself when it
        has them already, else a copy with the missing ones appended in the order given."""
        missing = [t for t in tokens if t not in self.added_tokens]
        if not missing:
            return self
        if self._sp is not None:
            return Tokenizer(sp=self._sp, num_sentinels=self.num_sentinels,
                             added_tokens=self.added_tokens + tuple(missing), source=self.source)
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(self._hf.to_str())
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return Tokenizer(hf=hf, num_sentinels=self.num_sentinels, added_tokens=self.added_tokens + tuple(missing),
                         source=self.source)

    def _special_id(self, match: re.Match) -> int:
        if match.group(1) is not None:
            i = int(match.group(1))
            return self.sentinel_end - 1 - i if i < self.num_sentinels else -1
        if match.group(0) in self.added_tokens:
            return self.added_token_id(match.group(0))
        return {PAD: self.pad_id, EOS: self.eos_id, UNK: self.unk_id}[match.group(0)]

    def _encode_sp_with_specials(self, text: str) -> list[int]:
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            special = self._special_id(m)
            if special < 0:  # <extra_id_N> beyond our sentinels: ordinary text
                continue
            if m.start() > start:
                ids += self._sp.encode(text[start : m.start()])
            ids.append(special)
            start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        return self.encode_batch([text], add_eos=add_eos)[0]

    def encode_batch(self, texts: list[str], add_eos: bool = True) -> list[list[int]]:
        texts = list(texts)
        if self._sp is not None:
            out = self._sp.encode(texts, num_threads=self.num_threads)
            for i, text in enumerate(texts):
                if ("<" in text or "[" in text) and self._special_re.search(text):
                    out[i] = self._encode_sp_with_specials(text)
        else:
            out = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if add_eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def token_to_string(self, i: int) -> str:
        if self.is_sentinel(i):
            return f"<extra_id_{self.sentinel_end - 1 - i}>"
        if self.sentinel_end <= i < self.vocab_size:
            return self.added_tokens[i - self.sentinel_end]
        if self._sp is not None:
            return self._sp.id_to_piece(i)
        return self._hf.id_to_token(i)

    def is_special(self, i: int) -> bool:
        return i in (self.pad_id, self.eos_id, self.unk_id) or self._base_size <= i < self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        # Ids outside the tokenizer (-100 label padding, the model's padded embedding rows) mean nothing.
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if not self.is_special(i)])
        # Keep specials visible, laid out as transformers shows them: "Hello<extra_id_0> world</s>".
        parts, segment = [], []
        for i in ids:
            if self.is_special(i):
                if segment:
                    parts.append(self._decode_segment(segment, first=not parts))
                    segment = []
                parts.append(self.token_to_string(i))
            else:
                segment.append(i)
        if segment:
            parts.append(self._decode_segment(segment, first=not parts))
        return "".join(parts)

    def _decode_segment(self, ids: list[int], first: bool) -> str:
        text = self._sp.decode(ids)
        # sentencepiece drops the word-boundary space of the first piece; inside a sequence it is real.
        if not first and self._sp.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    # ------------------------------------------------------------------ files
    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        additional = [f"<extra_id_{i}>" for i in range(self.num_sentinels)] + list(self.added_tokens)
        if self._sp is not None:
            (directory / "spiece.model").write_bytes(self._sp.serialized_model_proto())
        else:
            self._hf.save(str(directory / "tokenizer.json"))
        special = {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": additional}
        config = {
            # transformers' T5Tokenizer rebuilds sentinels from `extra_ids` for spiece.model, and for a
            # tokenizer.json finds them already inside.
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": self.num_sentinels if self._sp is not None else 0,
            "model_max_length": 1_000_000_000,  # relative attention: no hard limit
            **special,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------- loading
def _load_spiece(path: Path, num_sentinels: int, added_tokens=()) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as err:
        raise T5ForgeError(f"{path} is not a readable SentencePiece model ({err})") from None
    got = (sp.pad_id(), sp.eos_id(), sp.unk_id())
    if got != (0, 1, 2):
        raise T5ForgeError(
            f"{path} has pad/eos/unk ids {got}, but T5 needs pad=0, eos=1, unk=2; train a T5-style "
            "vocabulary with `t5forge tokenizer train`"
        )
    if sp.get_piece_size() <= 3:
        raise T5ForgeError(f"{path} has only {sp.get_piece_size()} pieces: too small to tokenize text")
    if sp.piece_to_id("<extra_id_0>") != sp.unk_id():
        raise T5ForgeError(
            f"{path} already contains <extra_id_N> pieces; t5forge appends T5's sentinels itself, so the "
            "SentencePiece model must not define them"
        )
    return Tokenizer(sp=sp, num_sentinels=num_sentinels, added_tokens=added_tokens, source=str(path))


def _load_tokenizer_json(path: Path, num_sentinels: int) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises bare Exception subclasses from Rust
        raise T5ForgeError(f"{path} is not a readable tokenizers file ({err})") from None
    layout = [hf.id_to_token(i) for i in range(3)]
    if layout != [PAD, EOS, UNK]:
        raise T5ForgeError(
            f"{path} has tokens {layout} at ids 0,1,2, but T5 needs ['<pad>', '</s>', '<unk>']; use a T5-layout "
            "tokenizer or train one with `t5forge tokenizer train`"
        )
    size = hf.get_vocab_size(with_added_tokens=True)
    present = 0
    while hf.token_to_id(f"<extra_id_{present}>") is not None:
        present += 1
    if present == 0:
        # Like transformers' extra_ids: sentinels go on top, <extra_id_0> last so it gets the highest id.
        hf.add_special_tokens(
            [AddedToken(f"<extra_id_{i}>", special=True, normalized=False) for i in reversed(range(num_sentinels))]
        )
        present = num_sentinels
        size = hf.get_vocab_size(with_added_tokens=True)
    # tokens after <extra_id_0> are added tokens (UL2's paradigm tokens), in id order
    end = hf.token_to_id("<extra_id_0>") + 1 if present else size
    added = tuple(hf.id_to_token(i) for i in range(end, size))
    for i in range(present):
        if hf.token_to_id(f"<extra_id_{i}>") != end - 1 - i:
            raise T5ForgeError(
                f"{path}: <extra_id_{i}> has id {hf.token_to_id(f'<extra_id_{i}>')}, but T5 puts it at "
                f"{end - 1 - i}, below <extra_id_{i - 1 if i else 0}>; the sentinels must be the top ids "
                "(only added tokens such as [NLU] may follow them)"
            )
    if end - present <= 3:
        raise T5ForgeError(f"{path} has only {size} tokens: too small for {present} sentinels plus a vocabulary")
    return Tokenizer(hf=hf, num_sentinels=present, added_tokens=added, source=str(path))


def _specials_from_config(directory: Path) -> tuple[int, tuple]:
    """(sentinels, added tokens) of a spiece.model, from the tokenizer_config.json beside it: its
    `extra_ids`, and the `additional_special_tokens` that are not sentinels (in order)."""
    config = directory / "tokenizer_config.json"
    sentinels, added = NUM_SENTINELS, ()
    if config.is_file():
        try:
            values = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise T5ForgeError(f"{config} is not valid JSON ({err})") from None
        value = values.get("extra_ids")
        if isinstance(value, int) and value >= 0:
            sentinels = value
        listed = values.get("additional_special_tokens") or []
        added = tuple(t for t in listed if isinstance(t, str) and not _SPECIAL_RE.fullmatch(t))
    return sentinels, added


def _load_path(path: Path) -> Tokenizer:
    if path.is_dir():
        for name in _TOKENIZER_FILES:
            if (path / name).is_file():
                return _load_path(path / name)
        raise T5ForgeError(f"{path} holds neither spiece.model nor tokenizer.json; point at a tokenizer file or folder")
    if path.stat().st_size == 0:
        raise T5ForgeError(f"tokenizer file {path} is empty")
    if path.suffix == ".json":
        return _load_tokenizer_json(path, NUM_SENTINELS)
    return _load_spiece(path, *_specials_from_config(path.parent))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".model", ".json")) or spec.count("/") > 1


def _download(repo_id: str, option: str) -> Path:
    from t5forge.hub import HubUnavailable, snapshot

    try:
        return snapshot(
            repo_id,
            allow_patterns=["spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
        )
    except HubUnavailable as err:
        raise T5ForgeError(
            f"tokenizer {repo_id!r} is not a local file or folder, and {err}; pass a local spiece.model, "
            f"tokenizer.json or a folder holding one: {option}=PATH/spiece.model"
        ) from None


def load_tokenizer(spec, option: str = "data.tokenizer") -> Tokenizer:
    """A T5 tokenizer from a spiece.model / tokenizer.json file, a folder holding one, or a Hub repo id.
    `option`: how the calling command names the tokenizer (`data.tokenizer`, `--tokenizer`), for the
    advice when a Hub id cannot be fetched."""
    if isinstance(spec, Tokenizer):
        return spec
    spec_str = str(spec)
    if not spec_str:
        raise T5ForgeError("no tokenizer given: pass a spiece.model, tokenizer.json, folder or Hub repo id")
    path = Path(spec_str).expanduser()
    if path.exists():
        return _load_path(path)
    if isinstance(spec, Path) or _looks_like_path(spec_str):
        raise T5ForgeError(f"tokenizer file {spec_str} does not exist")
    return _load_path(_download(spec_str, option))

