"""`t5forge data preview`: show span-corrupted pre-training examples exactly as training sees them.

    t5forge data preview --files c4-train.00000-of-01024.json.gz --tokenizer spiece.model -n 3
    t5forge data preview --dataset allenai/c4 --dataset-config en --tokenizer google/t5-v1_1-base
"""

from __future__ import annotations

HELP = "preview span-corrupted pre-training examples (inputs with sentinels, targets, lengths, noise)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("preview", help="decode a few corrupted examples")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--files", nargs="+", metavar="FILE",
                       help="local text files, folders or globs (.txt, .json/.jsonl, .parquet, optionally .gz)")
    where.add_argument("--dataset", default="allenai/c4", help="Hub dataset (or a local dataset folder)")
    p.add_argument("--dataset-config", default="en")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", default="google/t5-v1_1-base",
                   help="spiece.model, tokenizer.json, a folder holding one, or a Hub id")
    p.add_argument("-n", "--num-examples", type=int, default=3)
    p.add_argument("--input-length", type=int, default=512)
    p.add_argument("--noise-density", type=float, default=0.15)
    p.add_argument("--mean-noise-span-length", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-decode-error", choices=["raise", "skip"], default="raise")


def run(args) -> int:
    from t5forge.data.loader import build_pretrain_loader
    from t5forge.errors import T5ForgeError
    from t5forge.tokenizer import load_tokenizer

    if args.num_examples < 1:
        raise T5ForgeError(f"-n must be at least 1, got {args.num_examples}")
    tok = load_tokenizer(args.tokenizer)
    loader = build_pretrain_loader(
        tokenizer=tok, dataset=args.dataset, dataset_config=args.dataset_config, files=args.files or (),
        text_field=args.text_field, split=args.split, batch_size=args.num_examples, input_length=args.input_length,
        noise_density=args.noise_density, mean_noise_span_length=args.mean_noise_span_length, seed=args.seed,
        on_decode_error=args.on_decode_error, skip_option="--on-decode-error skip",
    )
    batch = next(iter(loader))
    c = loader.corruption
    print(f"source: {loader.source!r}; tokenizer: {tok.source} ({tok.vocab_size} tokens)")
    print(f"raw chunk {c.raw_length} tokens -> input {c.input_length} + target {c.target_length} "
          f"({c.num_noise_spans} noise spans, density {args.noise_density}, mean span {args.mean_noise_span_length})")
    for i in range(args.num_examples):
        inputs, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        sentinels = sum(1 for t in labels if t >= tok.vocab_size - tok.num_sentinels)
        noise = len(labels) - sentinels - 1  # target = sentinel + span per span, then EOS
        print(f"\n=== example {i}: input {len(inputs)} tokens, target {len(labels)} tokens, "
              f"{sentinels} spans, noise {noise}/{c.raw_length} = {noise / c.raw_length:.4f}")
        print("--- input:")
        print(tok.decode(inputs, skip_special_tokens=False))
        print("--- target:")
        print(tok.decode(labels, skip_special_tokens=False))
    if loader.source.skipped_undecodable:
        print(f"\nskipped {loader.source.skipped_undecodable} record(s) with undecodable bytes")
    return 0
