"""Fine-tuning batches: padding, -100 labels, truncation with EOS, reference choice."""

import random

import torch

from t5forge.data.seq2seq import Seq2SeqExample, collate_seq2seq

EXAMPLES = [
    Seq2SeqExample(id="0", source="Translate to German: The house is wonderful.", references=("Das Haus ist wunderbar.",)),
    Seq2SeqExample(id="1", source="Hi", references=("a", "b b", "c c c")),
]


def test_padding_mask_and_labels(t5_tokenizer):
    batch = collate_seq2seq(EXAMPLES, t5_tokenizer, 1024, 128)
    src = [t5_tokenizer.encode(e.source) for e in EXAMPLES]
    tgt = [t5_tokenizer.encode(e.references[0]) for e in EXAMPLES]
    assert batch["input_ids"].shape == (2, max(map(len, src)))
    assert batch["input_ids"].dtype == torch.long
    for i in range(2):
        n, m = len(src[i]), len(tgt[i])
        assert batch["input_ids"][i, :n].tolist() == src[i]
        assert (batch["input_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i, :m].tolist() == tgt[i]
        assert (batch["labels"][i, m:] == -100).all()
        assert tgt[i][-1] == t5_tokenizer.eos_id


def test_pad_to_multiple_and_truncation(t5_tokenizer):
    batch = collate_seq2seq(EXAMPLES, t5_tokenizer, 5, 3, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    full = t5_tokenizer.encode(EXAMPLES[0].source)
    # transformers' truncation=True: first max-1 tokens, then EOS.
    assert batch["input_ids"][0, :5].tolist() == full[:4] + [t5_tokenizer.eos_id]
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert batch["labels"][0, :3].tolist()[-1] == t5_tokenizer.eos_id
    assert (batch["labels"][0, 3:] == -100).all()


def test_reference_choice(t5_tokenizer):
    first = collate_seq2seq(EXAMPLES, t5_tokenizer, 64, 16)
    assert t5_tokenizer.decode(first["labels"][1]) == "a"
    seen = set()
    rng = random.Random(0)
    for _ in range(30):
        seen.add(t5_tokenizer.decode(collate_seq2seq(EXAMPLES, t5_tokenizer, 64, 16, rng=rng)["labels"][1]))
    assert seen == {"a", "b b", "c c c"}
    a = collate_seq2seq(EXAMPLES * 4, t5_tokenizer, 64, 16, rng=random.Random(3))["labels"]
    b = collate_seq2seq(EXAMPLES * 4, t5_tokenizer, 64, 16, rng=random.Random(3))["labels"]
    assert torch.equal(a, b)


def test_dict_examples(t5_tokenizer):
    batch = collate_seq2seq([{"source": "x y", "target": "z"}, {"source": "q", "references": ["r", "s"]}], t5_tokenizer, 8, 8)
    assert t5_tokenizer.decode(batch["labels"][0]) == "z" and t5_tokenizer.decode(batch["labels"][1]) == "r"


def test_same_tensors_as_transformers_tokenizer_call(t5_tokenizer, tmp_path):
    # Tk-Instruct's collator: tokenizer(texts, max_length, padding="longest", truncation=True,
    # pad_to_multiple_of=8), labels with padding replaced by -100.
    from transformers import AutoTokenizer

    t5_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    examples = EXAMPLES + [Seq2SeqExample(id="2", source="A much longer source text, " * 5, references=("tiny " * 12,))]
    ours = collate_seq2seq(examples, t5_tokenizer, 16, 8, pad_to_multiple_of=8)
    src = hf([e.source for e in examples], max_length=16, padding="longest", truncation=True,
             pad_to_multiple_of=8, return_tensors="pt")
    tgt = hf([e.references[0] for e in examples], max_length=8, padding="longest", truncation=True,
             pad_to_multiple_of=8, return_tensors="pt")
    assert ours["input_ids"].shape == (3, 16) and ours["labels"].shape == (3, 8)  # both truncated
    assert torch.equal(ours["input_ids"], src["input_ids"])
    assert torch.equal(ours["attention_mask"], src["attention_mask"])
    assert torch.equal(ours["labels"], tgt["input_ids"].masked_fill(~tgt["attention_mask"].bool(), -100))
