"""Padded vs packed (padding-free) fine-tuning batches on the SNI subset: tokens/s at equal loss.

    python benchmarks/finetune_packing.py                       # t5-v1.1-small shape, CPU fp32
    python benchmarks/finetune_packing.py --shape tiny --batch 8 --rounds 2   # a quick look

The examples are SNI training instances with nanoT5's Tk-Instruct prompts (definition + 2 positive
examples, max_seq_len 1024, max_target_len 128) and the real T5 vocabulary. Both layouts train the
same micro-batches of `--batch` examples (drawn by t5forge's FinetuneLoader with one seed; the
packed loader lays the same examples out several to a row, by default in rows as `t5forge finetune`
sizes them: on CPU with sdpa the whole micro-batch in one row) on the same initial weights, with
AdamWScale, dropout 0, fp32 unless --precision bf16 (autocast, as `t5forge finetune`). The two run
INTERLEAVED, one step each per round, and the headline is the median of the per-round speed ratio.
Tokens/s counts real tokens only (encoder inputs + target tokens, padding excluded): the same
numerator for both layouts. The first step's summed losses must
agree (same examples, same weights), or the script stops.

Writes benchmarks/results/finetune_packing-<device>.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import environment, shape_config  # noqa: E402  (the sibling benchmark's shapes)

from t5forge.data.finetune_loader import FinetuneLoader  # noqa: E402
from t5forge.data.instructions import load_sni  # noqa: E402
from t5forge.model import fast  # noqa: E402
from t5forge.model.fast.spans import use_spans  # noqa: E402
from t5forge.model.loss import TokenNLL  # noqa: E402
from t5forge.model.t5 import T5  # noqa: E402
from t5forge.optim.build import build_optimizer  # noqa: E402
from t5forge.tokenizer import load_tokenizer  # noqa: E402
from t5forge.train.loop import count_tokens  # noqa: E402
from t5forge.train.setup import autocast_for, enable_fast_math  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("T5FORGE_DATA", REPO.parent / "shared" / "data")).resolve()
MAX_SOURCE, MAX_TARGET = 1024, 128


class Side:
    def __init__(self, name, model, batches, device, precision="fp32"):
        from types import SimpleNamespace

        self.name, self.model, self.batches, self.device = name, model.to(device).train(), batches, device
        _, self.loss_fn, _ = fast.apply(self.model, TokenNLL(), device=device)  # as `t5forge finetune` trains
        self.autocast = autocast_for(precision, device)
        self.optimizer = build_optimizer(self.model, SimpleNamespace(name="adamwscale", base_lr=1e-3, weight_decay=0.0))
        self.times, self.losses = [], []

    def step(self, i: int, record: bool = True) -> float:
        batch = {k: v.to(self.device) for k, v in self.batches[i].items()}
        n_targets = int((batch["labels"] != -100).sum())
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss_fn(*self.model.output_projection(self.model(**batch).hidden), batch["labels"])
        (loss / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t0)
        self.losses.append(float(loss.detach()))
        return float(loss.detach())


def fewest_rows(batch) -> int:
    """The fewest rows of this packed batch's width that could hold its examples' real tokens:
    no packing at that width does better, so padded rows / this bounds the row-count gain."""
    rows, source_width = batch["input_ids"].shape
    source = int((batch["encoder_segment_ids"] != 0).sum())
    target = int((batch["labels"] != -100).sum())
    return max(-(-source // source_width), -(-target // batch["labels"].shape[1]))


def row_capacity(args, device) -> tuple[int | None, int | None]:
    """(source, target) packed row capacity, None = the batch's longest; -1 asks t5forge finetune's rule."""
    from t5forge.config_files import load_config
    from t5forge.train.finetune import pack_capacity

    if args.pack_source_len >= 0 and args.pack_target_len >= 0:
        return args.pack_source_len or None, args.pack_target_len or None
    cfg = load_config(["finetune.pack=true", f"model.attention={args.attention}",
                       f"finetune.max_seq_len={MAX_SOURCE}", f"finetune.max_target_len={MAX_TARGET}"], base="ft")
    auto = pack_capacity(cfg, args.batch, device)
    return tuple(a if given < 0 else (given or None) for a, given in zip(auto, (args.pack_source_len,
                                                                                 args.pack_target_len)))


def layout_stats(batches) -> dict:
    cells = sum(b["input_ids"].numel() + b["labels"].numel() for b in batches)
    real = sum(count_tokens(b) for b in batches)
    return {"rows_per_batch": statistics.mean(b["input_ids"].shape[0] for b in batches),
            "source_width": statistics.mean(b["input_ids"].shape[1] for b in batches),
            "target_width": statistics.mean(b["labels"].shape[1] for b in batches),
            "padding_fraction": 1 - real / cells, "real_tokens_per_batch": real / len(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", help="tiny | small | base")
    parser.add_argument("--batch", type=int, default=16, help="examples per micro-batch")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per layout (interleaved)")
    parser.add_argument("--instances", type=int, default=100, help="SNI instances per training task")
    parser.add_argument("--pack-source-len", type=int, default=-1,
                        help="packed row capacity (-1 = as `t5forge finetune`: the whole micro-batch in one row "
                             "with sdpa on CPU, else the batch's longest; 0 = the batch's longest)")
    parser.add_argument("--pack-target-len", type=int, default=-1, help="the same for targets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", default="sdpa", help="sdpa | eager | flex (flex trains on GPU only)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    enable_fast_math(device)  # as `t5forge finetune` does (subnormals flushed on CPU)

    tokenizer = load_tokenizer(str(DATA / "t5-spiece" / "spiece.model"))
    examples = load_sni(DATA / "sni", "train", tokenizer, max_num_instances_per_task=args.instances,
                        max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET, seed=2137)
    lengths = [(len(s), len(t)) for s, t in zip(tokenizer.encode_batch([e.source for e in examples]),
                                                 tokenizer.encode_batch([e.references[0] for e in examples]))]
    src = sorted(min(s, MAX_SOURCE) for s, _ in lengths)
    tgt = sorted(min(t, MAX_TARGET) for _, t in lengths)

    def quantiles(xs):
        return {"mean": round(statistics.mean(xs), 1), "p10": xs[len(xs) // 10], "median": xs[len(xs) // 2],
                "p90": xs[9 * len(xs) // 10], "max": xs[-1]}

    n = args.rounds + 1  # + one warm-up step
    common = {"batch_size": args.batch, "max_source_length": MAX_SOURCE, "max_target_length": MAX_TARGET, "seed": 0}
    padded_loader = iter(FinetuneLoader(examples, tokenizer, **common))
    capacity = row_capacity(args, device)
    packed_loader = iter(FinetuneLoader(examples, tokenizer, pack=True, pack_source_len=capacity[0],
                                        pack_target_len=capacity[1], **common))
    padded = [next(padded_loader) for _ in range(n)]
    packed = [next(packed_loader) for _ in range(n)]

    torch.manual_seed(0)
    model = T5(shape_config(args.shape, args.attention)[0])  # the throughput benchmark's shapes, dropout 0
    sides = [Side("padded", model, padded, device, args.precision),
             Side("packed", copy.deepcopy(model), packed, device, args.precision)]
    first = [s.step(0, record=False) for s in sides]
    if abs(first[0] - first[1]) > (1e-4 if args.precision == "fp32" else 2e-2) * abs(first[0]):
        raise SystemExit(f"first-step summed losses differ: padded {first[0]:.4f}, packed {first[1]:.4f}")
    for r in range(1, n):
        for side in (sides if r % 2 else sides[::-1]):
            side.step(r)
            print(f"  round {r} {side.name}: {side.times[-1]:.3f} s", file=sys.stderr)

    tokens = [count_tokens(b) for b in padded[1:]]  # the same real tokens in both layouts
    report = {"shape": args.shape, "device": device.type, "precision": args.precision, "attention": args.attention,
              "batch_examples": args.batch, "rounds": args.rounds,
              "pack_capacity": [c or 0 for c in capacity],
              "packed_attention": ("example by example (spans)" if use_spans(args.attention, device) else
                                   "flex block mask" if args.attention == "flex" else "dense block-diagonal mask"),
              "examples": len(examples), "sni_lengths": {"source": quantiles(src), "target": quantiles(tgt)},
              "first_step_summed_loss": dict(zip(("padded", "packed"), first)), "environment": environment(device),
              "load_average": round(os.getloadavg()[0], 2), "layouts": {}}
    for side in sides:
        report["layouts"][side.name] = {
            **layout_stats(side.batches[1:]), "median_step_s": statistics.median(side.times),
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, side.times)),
            "losses": side.losses}
    report["speedup"] = statistics.median(a / b for a, b in zip(sides[0].times, sides[1].times))
    # At the padded batches' width a packed row costs about what a padded one does, so the speed-up
    # cannot go much beyond padded rows / this (a few percent either way: cache effects, noise).
    report["fewest_rows_per_batch"] = statistics.mean(fewest_rows(b) for b in packed[1:])

    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"finetune_packing-{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    env, s, t = r["environment"], r["sni_lengths"]["source"], r["sni_lengths"]["target"]
    lines = [f"# Fine-tuning on SNI: padded vs packed batches ({r['device']}, {r.get('precision', 'fp32')}, "
             f"{r['shape']} shape, attention {r.get('attention', 'sdpa')})", "",
             f"Command: `python {env['command']}`", "",
             f"- hardware: {env['hardware']}; python {env['python']}, torch {env['torch']}; git {env['git_sha'][:12]}"
             f"{' + uncommitted changes' if env['uncommitted_changes'] else ''}; load average {r['load_average']}",
             f"- {r['examples']} SNI training examples (Tk-Instruct def + 2 pos, 1024/128 tokens); source tokens "
             f"mean {s['mean']}, p10/median/p90 {s['p10']}/{s['median']}/{s['p90']}, max {s['max']}; target tokens "
             f"mean {t['mean']}, median {t['median']}, p90 {t['p90']}, max {t['max']}",
             f"- micro-batches of {r['batch_examples']} examples, {r['rounds']} interleaved timed steps per layout "
             f"after one warm-up step; first-step summed loss padded {r['first_step_summed_loss']['padded']:.4f}, "
             f"packed {r['first_step_summed_loss']['packed']:.4f}",
             "- packed row capacity (source, target): " + ", ".join(
                 str(c) if c else "the batch's longest" for c in r["pack_capacity"])
             + (f" (the whole micro-batch in one row: {r['batch_examples']} x 1024 / 128)"
                if r["pack_capacity"] == [1024 * r["batch_examples"], 128 * r["batch_examples"]] else "")
             + f"; attention over packed rows: {r.get('packed_attention', 'dense block-diagonal mask')}", "",
             "| layout | rows | source x target width | padding | real tokens/s | step s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, x in r["layouts"].items():
        lines.append(f"| {name} | {x['rows_per_batch']:.1f} | {x['source_width']:.0f} x {x['target_width']:.0f} "
                     f"| {x['padding_fraction']:.0%} | {x['tokens_per_s']:,.0f} | {x['median_step_s']:.2f} |")
    lines += ["", f"Packed / padded speed: **{r['speedup']:.2f}x** (median over rounds of the per-round ratio).", ""]
    cells = {name: x["real_tokens_per_batch"] / (1 - x["padding_fraction"]) for name, x in r["layouts"].items()}
    lines += [f"Token positions (source + target, padding included) per micro-batch: padded {cells['padded']:,.0f}, "
              f"packed {cells['packed']:,.0f}, {cells['padded'] / cells['packed']:.2f}x fewer; the linear layers' work "
              "scales with these. The rest of a step does not shrink with them: the optimizer, gradient clipping "
              "and the embedding gradient cost the same per step in both layouts.", ""]
    if "fewest_rows_per_batch" in r and r["pack_capacity"] == [0, 0]:  # packed rows as wide as padded ones
        padded_rows = r["layouts"]["padded"]["rows_per_batch"]
        lines += [f"Bound at this row width: the examples' real tokens need at least "
                  f"{r['fewest_rows_per_batch']:.1f} packed rows per micro-batch, so no packing of these "
                  f"micro-batches saves more than {padded_rows:.1f} / {r['fewest_rows_per_batch']:.1f} = "
                  f"**{padded_rows / r['fewest_rows_per_batch']:.2f}x** of the rows.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
