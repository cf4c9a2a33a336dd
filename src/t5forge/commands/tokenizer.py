"""`t5forge tokenizer`: train a T5-style SentencePiece vocabulary, or show what a tokenizer does.

    t5forge tokenizer train --input corpus/*.jsonl.gz --vocab-size 32128 --output my_vocab/
    t5forge tokenizer show --tokenizer my_vocab/ --text "Hello world"
"""

from __future__ import annotations

HELP = "train a T5-style SentencePiece vocabulary (pad 0, eos 1, unk 2, sentinels on top), or inspect one"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a unigram vocabulary on your corpus")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="text files, folders or globs (.txt one document per line, .json/.jsonl, .parquet, .gz)")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="total size including the sentinels; rounded up to a multiple of 128")
    train.add_argument("--output", required=True, help="folder to write spiece.model and its config files to")
    train.add_argument("--text-field", default="text", help="field holding the text in json/parquet records")
    train.add_argument("--extra-ids", type=int, default=100, help="number of <extra_id_N> sentinels (T5: 100)")
    train.add_argument("--max-sentences", type=int, default=2_000_000,
                       help="train on at most this many lines (SentencePiece samples them)")
    train.add_argument("--on-decode-error", choices=["raise", "skip"], default="raise",
                       help="what to do with records that are not valid UTF-8")

    show = sub.add_parser("show", help="print a tokenizer's layout and how it splits a text")
    show.add_argument("--tokenizer", required=True, help="spiece.model, tokenizer.json, a folder or a Hub id")
    show.add_argument("--text", default="Studies have shown that owning a dog is good for you <extra_id_0>.")


def run(args) -> int:
    from t5forge.tokenizer import load_tokenizer

    if args.tokenizer_command == "train":
        from t5forge.data.tokenizer_train import rounded_vocab_size, train_tokenizer

        total = rounded_vocab_size(args.vocab_size)
        if total != args.vocab_size:
            print(f"vocab size {args.vocab_size} -> {total} (a multiple of 128)")
        tok = train_tokenizer(
            args.input, args.vocab_size, args.output, text_field=args.text_field, extra_ids=args.extra_ids,
            max_sentences=args.max_sentences, on_decode_error=args.on_decode_error,
        )
        print(f"wrote {args.output}: {tok.vocab_size} tokens = {tok.vocab_size - tok.num_sentinels} "
              f"SentencePiece pieces + {tok.num_sentinels} sentinels")
        print(f"use it with data.tokenizer={args.output}")
        return 0

    tok = load_tokenizer(args.tokenizer, option="--tokenizer")
    print(f"{tok.source}: vocab_size {tok.vocab_size}, pad {tok.pad_id}, eos {tok.eos_id}, unk {tok.unk_id}, "
          f"{tok.num_sentinels} sentinels (<extra_id_0> = {tok.sentinel_id(0) if tok.num_sentinels else '-'})")
    ids = tok.encode(args.text)
    print("ids:   ", ids)
    print("tokens:", [tok.token_to_string(i) for i in ids])
    print("decode:", tok.decode(ids, skip_special_tokens=False))
    return 0
