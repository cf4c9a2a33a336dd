"""Train a T5-style SentencePiece vocabulary on the user's corpus.

T5's conventions (read from the trainer spec inside T5's own spiece.model): unigram model,
nmt_nfkc normalisation, character coverage 0.9995, pad 0 / eos 1 / unk 2 and no bos, sentences
up to 4192 bytes. The sentinels are not SentencePiece pieces: like T5, the tokenizer appends
`extra_ids` of them on top, so the SentencePiece model gets `vocab_size - extra_ids` pieces and
the total (what the model's embedding needs) is a multiple of 128.

The corpus is read through `t5forge.data.sources`, so every format and every bad-input check of
pre-training applies here too. Each line of a document is one SentencePiece "sentence".
"""

from __future__ import annotations

import io
import os
import re

from t5forge.data.sources import TextSource
from t5forge.errors import T5ForgeError

MULTIPLE = 128  # embedding rows in multiples of 128 keep matmuls tensor-core friendly


def rounded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // MULTIPLE) * MULTIPLE


def _sentences(source: TextSource, limit: int):
    count = 0
    for shard in range(source.num_shards):
        for text in source.texts(shard):
            for line in text.split("\n"):
                if line.strip():
                    yield line
                    count += 1
                    if count >= limit:
                        return


def train_tokenizer(
    files,
    vocab_size: int,
    output_dir,
    *,
    text_field: str = "text",
    extra_ids: int = 100,
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    on_decode_error: str = "raise",
):
    """Train, save to `output_dir` (spiece.model + HF config files) and return the loaded Tokenizer."""
    import sentencepiece as spm

    from t5forge.tokenizer import Tokenizer, load_tokenizer

    if extra_ids < 0:
        raise T5ForgeError(f"--extra-ids must be >= 0, got {extra_ids}")
    total = rounded_vocab_size(vocab_size)
    pieces = total - extra_ids
    if pieces < 8:
        raise T5ForgeError(
            f"vocabulary of {total} is too small for {extra_ids} sentinels plus pad/eos/unk and text pieces"
        )
    source = TextSource(
        files=files, text_field=text_field, on_decode_error=on_decode_error, skip_option="--on-decode-error skip"
    )
    sentences = _sentences(source, max_sentences)
    try:
        first = next(sentences)
    except StopIteration:
        raise T5ForgeError(f"no text to train a tokenizer on in {source!r}") from None
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chain(first, sentences),
            model_writer=model,
            model_type="unigram",
            vocab_size=pieces,
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            max_sentence_length=4192,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # SentencePiece logs to stderr per step otherwise
        )
    except RuntimeError as err:
        raise _training_error(err, extra_ids) from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # save() writes spiece.model plus `extra_ids` in tokenizer_config.json, which the reload reads
    Tokenizer(sp=sp, num_sentinels=extra_ids, source="trained").save(output_dir)
    return load_tokenizer(output_dir)


def _chain(first, rest):
    yield first
    yield from rest


def _training_error(err: RuntimeError, extra_ids: int) -> T5ForgeError:
    message = str(err).strip()
    limit = re.search(r"value <= (\d+)", message)
    if limit:
        most = int(limit.group(1))
        fits = (most + extra_ids) // MULTIPLE * MULTIPLE
        hint = f"use --vocab-size {fits} or less" if fits - extra_ids >= 8 else "give more text, or a smaller --vocab-size"
        return T5ForgeError(
            f"the corpus is too small for this vocabulary: SentencePiece can make at most {most} pieces from it "
            f"(plus {extra_ids} sentinels); {hint}"
        )
    return T5ForgeError(f"SentencePiece training failed: {message.splitlines()[-1]}")
