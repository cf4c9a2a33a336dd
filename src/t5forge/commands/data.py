"""`t5forge data preview`: show the span-corrupted examples a pre-training run trains on.

With data.objective=ul2 every example is labelled with its denoiser (R/X span corruption, S prefix
LM) and the header lists the mixture; `--per-denoiser N` shows N examples of each denoiser instead
of the first -n (reading on until each has them).

The items are those of `t5forge pretrain` (`task=NAME`, `config=FILE`, `a.b=value`), so

    t5forge data preview config=runs/my-run/config.yaml -n 3
    t5forge data preview task=pt_cpu data.train_files=[c4-train.00000-of-01024.json.gz] data.tokenizer=spiece.model

decodes the first examples of that run's first micro-batch: its tokenizer, files, input length,
noise, micro-batch size, seed and shuffling, through the run's own loader (train/pretrain.py).
The options (--files, --tokenizer, --input-length, ...) override single keys; without any item the
defaults are those of `t5forge pretrain` (nanoT5's).
"""

from __future__ import annotations

HELP = "preview span-corrupted (or UL2) pre-training examples (inputs with sentinels, targets, lengths, noise)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("preview", help="decode the first examples a pre-training run trains on",
                       description="Decode the first examples a pre-training run trains on (task=, config=, "
                                   "a.b=value as for `t5forge pretrain`; options override single keys).")
    p.add_argument("items", nargs="*", metavar="KEY=VALUE",
                   help="task=PRESET, config=FILE.yaml (e.g. a run's config.yaml) and overrides like "
                        "data.input_length=128")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--files", nargs="+", metavar="FILE",
                       help="local text files, folders or globs (.txt, .json/.jsonl, .parquet, optionally .gz): "
                            "data.train_files (data.validation_files with --split validation)")
    where.add_argument("--dataset", default=None, help="data.dataset: a Hub dataset (or a local dataset folder)")
    p.add_argument("--dataset-config", default=None, help="data.dataset_config")
    p.add_argument("--split", default="train", choices=["train", "validation"],
                   help="train: the run's training batches; validation: its held-out batches")
    p.add_argument("--text-field", default=None, help="data.text_field")
    p.add_argument("--tokenizer", default=None,
                   help="data.tokenizer: spiece.model, tokenizer.json, a folder holding one, or a Hub id")
    p.add_argument("-n", "--num-examples", type=int, default=3, help="examples to show (default: 3)")
    p.add_argument("--per-denoiser", type=int, default=0, metavar="N",
                   help="data.objective=ul2: show N examples of each denoiser instead (read on until each has N)")
    p.add_argument("--input-length", type=int, default=None, help="data.input_length")
    p.add_argument("--noise-density", type=float, default=None, help="data.mlm_probability")
    p.add_argument("--mean-noise-span-length", type=float, default=None, help="data.mean_noise_span_length")
    p.add_argument("--seed", type=int, default=None, help="seed")
    p.add_argument("--on-decode-error", choices=["raise", "skip"], default="raise")


def preview_config(args):
    """The RunConfig of the run to preview: the items, then the options that were given."""
    import dataclasses

    from t5forge.config import validate
    from t5forge.config_files import load_config
    from t5forge.errors import T5ForgeError

    cfg = load_config(args.items)
    if cfg.mode != "pt":
        raise T5ForgeError("this config is for fine-tuning (mode=ft); `data preview` shows span-corrupted "
                           "pre-training data")
    d = cfg.data
    changes = {
        "dataset_config": args.dataset_config, "text_field": args.text_field, "tokenizer": args.tokenizer,
        "input_length": args.input_length, "mlm_probability": args.noise_density,
        "mean_noise_span_length": args.mean_noise_span_length,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.files:
        changes["train_files" if args.split == "train" else "validation_files"] = list(args.files)
    if args.dataset is not None:  # the Hub dataset instead of the files
        changes.update(dataset=args.dataset, train_files=[], validation_files=[])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, **changes),
                              seed=args.seed if args.seed is not None else cfg.seed)
    validate(cfg)
    return cfg


def run(args) -> int:
    from collections import Counter

    from t5forge.distributed import World
    from t5forge.errors import T5ForgeError
    from t5forge.plan import make_plan
    from t5forge.train.pretrain import build_loader
    from t5forge.train.setup import load_run_tokenizer

    if args.num_examples < 1 or args.per_denoiser < 0:
        raise T5ForgeError(f"-n must be at least 1 and --per-denoiser at least 0, got {args.num_examples}, "
                           f"{args.per_denoiser}")
    cfg = preview_config(args)
    tok = load_run_tokenizer(cfg)
    plan = make_plan(cfg, num_sentinels=tok.num_sentinels)
    # The run's own loader: rank 0 of a one-process run (a run on N ranks gives each rank its own slice).
    loader = build_loader(cfg, plan, tok, World(), args.split, on_decode_error=args.on_decode_error,
                          skip_option="--on-decode-error skip")
    if loader is None:
        raise T5ForgeError("the run has no held-out data (data.validation_files is empty); "
                           "preview --split train, or set data.validation_files")
    micro = plan.micro_batch_size
    c, d = loader.corruption, cfg.data
    ul2 = d.objective == "ul2"
    if args.per_denoiser and not ul2:
        raise T5ForgeError("--per-denoiser needs data.objective=ul2 (span corruption has one kind of example)")
    print(f"source: {loader.source!r}; tokenizer: {tok.source} ({tok.vocab_size} tokens)")
    if ul2:
        print(f"UL2 mixture of {len(c.denoisers)} denoisers: input {c.input_length} tokens (paradigm token first), "
              f"targets padded to {c.target_length}")
        for line in c.describe():
            print(f"  {line}")
    else:
        print(f"raw chunk {c.raw_length} tokens -> input {c.input_length} + target {c.target_length} "
              f"({c.num_noise_spans} noise spans, density {d.mlm_probability}, mean span {d.mean_noise_span_length})")
    order = "corpus order" if args.split == "validation" or not d.shuffle_buffer else \
        f"shuffled in blocks of {d.shuffle_buffer} chunks"
    print(f"{args.split} batches of {micro} (the run's micro-batch), seed {cfg.seed}, {order}")
    loader.extra_keys = ("denoiser",) if ul2 else ()
    wanted = args.per_denoiser * len(c.denoisers) if args.per_denoiser else args.num_examples
    shown, per = 0, Counter()
    batches = iter(loader)
    for b, batch in enumerate(batches):
        for i in range(len(batch["input_ids"])):
            denoiser = int(batch["denoiser"][i]) if ul2 else 0
            if args.per_denoiser and per[denoiser] >= args.per_denoiser:
                continue
            per[denoiser] += 1
            shown += 1
            _show_example(tok, c, b, i, batch, denoiser if ul2 else None)
            if shown == wanted:
                break
        if shown == wanted or (not args.per_denoiser and b + 1 >= -(-args.num_examples // micro)):
            break
        if args.per_denoiser and b >= PER_DENOISER_BATCHES:
            break
    if shown < wanted:
        print(f"\nonly {shown} example(s): the data has no more" + (" in the batches read" if args.per_denoiser else ""))
    if loader.source.skipped_undecodable:
        print(f"\nskipped {loader.source.skipped_undecodable} record(s) with undecodable bytes")
    return 0


PER_DENOISER_BATCHES = 1000  # --per-denoiser reads at most this many batches


def _show_example(tok, c, b: int, i: int, batch, denoiser) -> None:
    inputs, labels = batch["input_ids"][i].tolist(), [t for t in batch["labels"][i].tolist() if t != -100]
    if "attention_mask" in batch:
        inputs = inputs[: int(batch["attention_mask"][i].sum())]
    sentinels = sum(1 for t in labels if tok.is_sentinel(t))
    head = f"\n=== batch {b} example {i}"
    if denoiser is None:
        noise = len(labels) - sentinels - 1  # target = sentinel + span per span, then EOS
        print(f"{head}: input {len(inputs)} tokens, target {len(labels)} tokens, "
              f"{sentinels} spans, noise {noise}/{c.raw_length} = {noise / c.raw_length:.4f}")
    else:
        spec, raw = c.denoisers[denoiser], c.raw_lengths[denoiser]
        if spec.kind == "S":
            what = f"prefix {len(inputs) - 2} + target {len(labels) - 1} of {raw} text tokens"
        else:
            noise = len(labels) - sentinels - 1
            what = f"{sentinels} spans, noise {noise}/{raw} = {noise / raw:.4f}"
        print(f"{head} [{spec.name} {spec.paradigm_token}]: input {len(inputs)} tokens, target {len(labels)} "
              f"tokens, {what}")
    print("--- input:")
    print(tok.decode(inputs, skip_special_tokens=False))
    print("--- target:")
    print(tok.decode(labels, skip_special_tokens=False))
