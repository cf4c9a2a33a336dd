"""t5forge.tokenizer against transformers' T5 tokenizer built from the real T5 spiece.model."""

import json

import pytest

from t5forge.errors import T5ForgeError
from t5forge.tokenizer import load_tokenizer


def _c4_lines(docs, n_docs=150):
    return [line for doc in docs[:n_docs] for line in doc.split("\n") if line.strip()]


def test_special_and_sentinel_ids_match_transformers(t5_tokenizer, hf_t5_tokenizer):
    tok, hf = t5_tokenizer, hf_t5_tokenizer
    assert tok.vocab_size == len(hf) == 32100
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert tok.num_sentinels == 100
    ours = [tok.sentinel_id(i) for i in range(100)]
    assert ours == hf.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ours[0] == 32099 and ours[-1] == 32000
    with pytest.raises(T5ForgeError, match="100 sentinels"):
        tok.sentinel_id(100)


def test_encode_real_c4_lines_equals_transformers(t5_tokenizer, hf_t5_tokenizer, c4_docs):
    lines = _c4_lines(c4_docs)
    assert len(lines) > 1000
    ours = t5_tokenizer.encode_batch(lines)
    theirs = hf_t5_tokenizer(lines)["input_ids"]  # adds </s> like add_eos=True
    mismatches = [line for line, a, b in zip(lines, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]
    assert t5_tokenizer.encode("Studies have shown that owning a dog is good for you", add_eos=False) == [
        6536, 43, 2008, 24, 293, 53, 3, 9, 1782, 19, 207, 21, 25,
    ]


def test_text_with_special_tokens_and_decode_match_transformers(t5_tokenizer, hf_t5_tokenizer):
    for text in ["Hello <extra_id_0> world <extra_id_1>.", "a</s>b<pad> <unk>x", "<extra_id_100> stays text"]:
        ids = t5_tokenizer.encode(text)
        assert ids == hf_t5_tokenizer.encode(text)
        assert t5_tokenizer.decode(ids, skip_special_tokens=False) == hf_t5_tokenizer.decode(ids)
        assert t5_tokenizer.decode(ids) == hf_t5_tokenizer.decode(ids, skip_special_tokens=True)
    assert t5_tokenizer.decode([8774, 32099, 296, 1, 0]) == "Hello world"
    assert t5_tokenizer.decode([8774, 32099, 296, 1, 0], skip_special_tokens=False) == "Hello<extra_id_0> world</s><pad>"
    # label padding and the model's padded embedding rows (32100..32127) decode to nothing
    assert t5_tokenizer.decode([8774, -100, 32127, 296]) == "Hello world"


def test_round_trip_of_real_text(t5_tokenizer, hf_t5_tokenizer, c4_docs):
    lines = _c4_lines(c4_docs, 60)
    exact = 0
    for line in lines:
        ids = t5_tokenizer.encode(line)
        decoded = t5_tokenizer.decode(ids)
        assert decoded == hf_t5_tokenizer.decode(ids, skip_special_tokens=True)
        if line.isascii() and t5_tokenizer.unk_id not in ids:
            # SentencePiece's nmt_nfkc collapses runs of spaces (and drops zero-width characters,
            # hence ASCII only); otherwise the text comes back unchanged
            assert decoded == " ".join(line.split())
            exact += 1
    assert exact > 0.6 * len(lines)  # most C4 lines are plain ASCII (curly quotes are not)


def test_save_loads_in_transformers_and_back(t5_tokenizer, c4_docs, tmp_path):
    from transformers import AutoTokenizer

    t5_tokenizer.save(tmp_path)
    assert (tmp_path / "spiece.model").is_file()
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    lines = _c4_lines(c4_docs, 20)
    assert auto(lines)["input_ids"] == t5_tokenizer.encode_batch(lines) == reloaded.encode_batch(lines)
    assert len(auto) == reloaded.vocab_size == 32100
    assert auto.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]


def test_tokenizer_json_backend(hf_t5_tokenizer, t5_tokenizer, c4_docs, tmp_path):
    from transformers import AutoTokenizer

    hf_t5_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.vocab_size, tok.num_sentinels, tok.sentinel_id(0)) == (32100, 100, 32099)
    lines = _c4_lines(c4_docs, 20)
    assert tok.encode_batch(lines) == hf_t5_tokenizer(lines)["input_ids"]
    assert tok.encode("x <extra_id_3> y") == t5_tokenizer.encode("x <extra_id_3> y")

    tok.save(tmp_path / "saved")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert auto(lines)["input_ids"] == tok.encode_batch(lines)
    assert load_tokenizer(tmp_path / "saved").encode_batch(lines) == tok.encode_batch(lines)

    # a T5-layout tokenizer.json without sentinels gets T5's 100 on top
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<extra_id_")]
    (tmp_path / "bare.json").write_text(json.dumps(spec))
    bare = load_tokenizer(tmp_path / "bare.json")
    assert (bare.vocab_size, bare.sentinel_id(0), bare.sentinel_id(99)) == (32100, 32099, 32000)


def test_bad_tokenizer_inputs(tmp_path, hf_t5_tokenizer):
    with pytest.raises(T5ForgeError, match="does not exist"):
        load_tokenizer(tmp_path / "nope" / "spiece.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(T5ForgeError, match="is empty"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(T5ForgeError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "folder").mkdir()
    with pytest.raises(T5ForgeError, match="neither spiece.model nor tokenizer.json"):
        load_tokenizer(tmp_path / "folder")

    # wrong id layout (GPT-2 style specials) and sentinels that are not the top ids
    spec = json.loads(_t5_json(hf_t5_tokenizer, tmp_path))
    spec["added_tokens"][0]["content"] = "<|endoftext|>"
    spec["model"]["vocab"][0][0] = "<|endoftext|>"
    (tmp_path / "gpt.json").write_text(json.dumps(spec))
    with pytest.raises(T5ForgeError, match="T5 needs"):
        load_tokenizer(tmp_path / "gpt.json")


def test_tokenizer_too_small_for_sentinels(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    tiny = HFTokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tiny.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(3))])
    tiny.save(str(tmp_path / "tiny.json"))
    with pytest.raises(T5ForgeError, match="too small for 3 sentinels"):
        load_tokenizer(tmp_path / "tiny.json")



def test_hub_repo_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(T5ForgeError, match="HF_HUB_OFFLINE=1 is set.*pass a local spiece.model.*data.tokenizer=PATH"):
        load_tokenizer("google/t5-v1_1-base")


def _t5_json(hf_t5_tokenizer, tmp_path) -> str:
    hf_t5_tokenizer.backend_tokenizer.save(str(tmp_path / "t5.json"))
    return (tmp_path / "t5.json").read_text()
