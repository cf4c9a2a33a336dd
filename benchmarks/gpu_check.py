"""The GPU path's decisive figures in one run under a global deadline (default 450 s of an H200):

  1. ceilings      measured bf16 matmul TFLOP/s and device-to-device copy GB/s;
  2. attention     nanoT5's self-attention (128 x 12 heads x 512 x 64, bf16, fwd+bwd with the bias
                   table's gradient): eager, SDPA with the float bias, FlexAttention with the bucket
                   score_mod, each checked against fp32 eager (output, table gradient) and timed;
  3. step          nanoT5's step (T5-v1.1-base, 128 x 512/114 real C4 batches, bf16 + compile):
                   t5forge sdpa, t5forge flex and transformers' T5ForConditionalGeneration (eager
                   attention, compiled), same weights and batches: s/step, tokens/s, MFU against the
                   measured peak and the 989 TFLOP/s datasheet figure, peak memory, first losses;
  4. profile       one t5forge step under torch.profiler: top kernels, host-sync counts;
  5. packing       packed vs padded SNI fine-tuning tokens/s (t5-v1.1-small, bf16), if time remains.

gpu_check.json (under $OUT when set, else --out) holds one object per stage with `status`
(ok | failed | skipped) and its figures; it is rewritten after every stage, so a run stopped at
its deadline still returns what it measured. Compilation is kept out of every timing (warm-up steps).

The device machine's image has torch 2.11 and transformers but not `datasets` / `omegaconf`, and
../shared is not copied there, so the real batches travel as one ignored file. Prepare it here:

    PYTHONPATH=src python benchmarks/gpu_check.py --prepare-data .device_data/

(C4 span-corrupted batches from t5forge's pre-training loader, SNI padded / packed batches from its
fine-tuning loader; a few MB; .device_data/ is in .gitignore). Then the device call is

    run(command="export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1; python3 benchmarks/gpu_check.py
                 --data .device_data/gpu_check_data.pt --deadline-s 450 2>&1 | tee $OUT/gpu_check.log",
        carry=[".device_data"], timeout_s=540)

which leaves time in a 15-minute lease for a machine start and one rerun (`--stages step,profile`
reruns only those). `--dry-run` runs every stage on the CPU at toy sizes (FlexAttention forward
only: it has no CPU backward) to check the plumbing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, INPUT_LENGTH, TARGET_LENGTH, build_pair, shape_config  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from t5forge.model import fast  # noqa: E402
from t5forge.model.config import T5Config  # noqa: E402
from t5forge.model.fast.attention import AttentionBias, attend  # noqa: E402
from t5forge.model.fast.flex import flex_attention, flex_bias  # noqa: E402
from t5forge.model.loss import TokenNLL  # noqa: E402
from t5forge.model.t5 import T5  # noqa: E402
from t5forge.model.flops import t5_flops_per_step  # noqa: E402
from t5forge.optim.build import build_optimizer  # noqa: E402
from t5forge.train.metrics_log import measure_matmul_flops  # noqa: E402

RANDOM = "random ids (no data file)"
STAGES = ("ceilings", "attention", "step", "profile", "packing")
DATASHEET_BF16 = 989e12  # H100/H200 SXM dense bf16
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "aten::item")


class Deadline(Exception):
    pass


# ------------------------------------------------------------------ data file
def prepare_data(out_dir: Path, c4_batches: int = 22, batch: int = 128, sni_batches: int = 6) -> Path:
    """The real batches the device needs, built with t5forge's own loaders, into one torch file."""
    from t5forge.data.finetune_loader import FinetuneLoader
    from t5forge.data.instructions import load_sni
    from t5forge.data.loader import build_pretrain_loader
    from t5forge.tokenizer import load_tokenizer

    spiece = DATA / "t5-spiece" / "spiece.model"
    c4 = DATA / "c4-sample" / "c4-en.train-00000-first1000.json.gz"
    loader = iter(build_pretrain_loader(tokenizer=str(spiece), files=[str(c4)], batch_size=batch,
                                        input_length=INPUT_LENGTH, seed=0))
    pretrain = []
    for _ in range(c4_batches):
        b = next(loader)
        pretrain.append({"input_ids": b["input_ids"].to(torch.int16), "labels": b["labels"].to(torch.int16)})
    tokenizer = load_tokenizer(str(spiece))
    examples = load_sni(DATA / "sni", "train", tokenizer, max_num_instances_per_task=100,
                        max_source_length=1024, max_target_length=128, seed=2137)
    common = {"batch_size": 64, "max_source_length": 1024, "max_target_length": 128, "seed": 0}
    padded = iter(FinetuneLoader(examples, tokenizer, **common))
    packed = iter(FinetuneLoader(examples, tokenizer, pack=True, **common))
    sni = {"padded": [next(padded) for _ in range(sni_batches)], "packed": [next(packed) for _ in range(sni_batches)]}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check_data.pt"
    torch.save({"pretrain": pretrain, "sni": sni, "source": "C4 sample (span corruption), SNI train (Tk-Instruct)"},
               path)
    return path


def load_data(path: str | None, dry: bool, vocab: int):
    if path:
        data = torch.load(path, weights_only=True)
        data["pretrain"] = [{k: v.long() for k, v in b.items()} for b in data["pretrain"]]
        if dry:  # toy sizes: two rows, shorter inputs and targets (the plumbing, not the figures)
            data["pretrain"] = [{"input_ids": b["input_ids"][:2, :64].contiguous(), "labels": b["labels"][:2, :16].contiguous()}
                                for b in data["pretrain"][:4]]
            data["sni"] = {k: [{n: t[:2].contiguous() for n, t in b.items()} for b in v[:2]] for k, v in data["sni"].items()}
        return data
    g = torch.Generator().manual_seed(0)  # dry run without a data file: random ids, toy lengths
    pretrain = [{"input_ids": torch.randint(2, vocab, (2, 32), generator=g),
                 "labels": torch.randint(2, vocab, (2, 8), generator=g)} for _ in range(4)]
    return {"pretrain": pretrain, "sni": None, "source": RANDOM}


# ------------------------------------------------------------------ timing helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(x, ref) -> float:
    return float((x.detach().float() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))


# ------------------------------------------------------------------ stages
def stage_ceilings(args, device, report):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else 512
    flops = measure_matmul_flops(device, dtype, size=size, repeats=10 if device.type == "cuda" else 3)
    n = (1 << 30) if device.type == "cuda" else (1 << 22)  # bytes per copy
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=10)
    report["peak_flops"] = flops
    return {"matmul_dtype": str(dtype), "matmul_size": size, "matmul_tflops": flops / 1e12,
            "copy_gbps_read_plus_write": 2 * n / seconds / 1e9}


def stage_attention(args, device, report):
    B, H, Q, D = (128, 12, 512, 64) if not args.dry_run else (2, 2, 32, 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(B, H, Q, D, device=device, generator=g) for _ in range(3)]
    table0 = torch.randn(32, H, device=device, generator=g) * 3
    buckets = torch.randint(0, 32, (Q, Q), device=device, generator=g)
    grad_out = torch.randn(B, H, Q, D, device=device, generator=g)

    def leaves(dt):
        return [t.detach().to(dt).requires_grad_() for t in base] + [table0.clone().requires_grad_()]

    def dense_bias(table, dt):  # the plain stack's form: (1, H, Q, K) from the table, in the matmuls' dtype
        return F.embedding(buckets, table).permute(2, 0, 1).contiguous()[None].to(dt)

    ref_in = leaves(torch.float32)
    ref_bias = dense_bias(ref_in[3], torch.float32)
    ref = torch.softmax(ref_in[0] @ ref_in[1].transpose(-2, -1) + ref_bias, dim=-1) @ ref_in[2]  # T5: no scaling
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    out = {"shape": [B, H, Q, D], "dtype": str(dtype)}
    flex = flex_attention(device)  # compiled on CUDA; on CPU compiled forward with --dry-run's compile
    if device.type == "cpu" and args.compile:
        flex = torch.compile(flex, dynamic=False)
    backward = device.type == "cuda"  # FlexAttention has no CPU backward; eager / sdpa train anywhere
    # eager: the plain model's one SDPA call; sdpa: the attention twin's kernels; flex: the flex twin's.
    for name in ("eager", "sdpa", "flex"):
        with_grads = backward or name != "flex"
        inputs = leaves(dtype) if with_grads else [t.to(dtype) for t in base] + [table0]

        def run(inputs=inputs, name=name, grads=True):
            if name == "flex":
                o = flex(*inputs[:3], score_mod=flex_bias(Q, Q, inputs[3], buckets)[0], scale=1.0)
            elif name == "sdpa":
                o = attend(*inputs[:3], AttentionBias("sdpa", dense=dense_bias(inputs[3], dtype)))
            else:
                o = F.scaled_dot_product_attention(*inputs[:3], attn_mask=dense_bias(inputs[3], dtype), scale=1.0)
            if grads:
                return o, torch.autograd.grad(o, inputs, grad_out.to(o.dtype))
            return o, None

        if with_grads:
            o, gr = run()
        else:
            with torch.no_grad():
                o, gr = run(grads=False)
        entry = {"out_rel_err": rel_err(o, ref)}
        if gr is not None:
            entry["table_grad_rel_err"] = rel_err(gr[3], ref_grads[3])
            entry["q_grad_rel_err"] = rel_err(gr[0], ref_grads[0])
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        entry["ok"] = all(v <= tol for k, v in entry.items() if k.endswith("rel_err"))
        if with_grads:
            entry["fwd_bwd_ms"] = 1e3 * median_seconds(run, device, repeats=args.repeats)
        else:
            with torch.no_grad():
                entry["fwd_ms"] = 1e3 * median_seconds(lambda: run(grads=False), device, repeats=args.repeats)
        out[name] = entry
    if not all(out[n]["ok"] for n in ("eager", "sdpa", "flex")):
        out["status"] = "failed"
        out["error"] = "an attention back end differs from fp32 eager beyond tolerance"
    return out


def toy(config, report):
    """The dry run's model: T5-v1.1's layout at toy width (the T5 vocabulary with real batches)."""
    vocab = 32128 if report["data"]["source"] != RANDOM else 512
    return dataclasses.replace(config, vocab_size=vocab, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)


class StepSide:
    """One model's training step as t5forge's loop takes it (AdamWScale, clip 1.0), over given batches;
    a t5forge model with its speed twins swapped in (fast.apply) and the token loss outside it, as
    `t5forge pretrain` builds it."""

    def __init__(self, name, model, device, precision, compile_model):
        self.name, self.device, self.model = name, device, model.to(device).train()
        self.loss_fn = None
        if isinstance(model, T5):
            _, self.loss_fn, _ = fast.apply(model, TokenNLL(), device=device, compiled=compile_model)
        self.optimizer = build_optimizer(self.model, argparse.Namespace(name="adamwscale", base_lr=2e-2,
                                                                        weight_decay=0.0))
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.bf16 = precision == "bf16"
        self.losses, self.times = [], []

    def step(self, batch):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if isinstance(self.model, T5):
                n_targets = (batch["labels"] != -100).sum()
                hidden = self.forward(**batch).hidden
                loss = self.loss_fn(*self.model.output_projection(hidden), batch["labels"]) / n_targets
            else:
                loss = self.forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def step_sides(args, device, config):
    ours, hf = build_pair(config, "eager")
    sides = [("t5forge-sdpa", ours)]
    if device.type == "cuda":  # flex trains on GPU only
        flex = T5(dataclasses.replace(config, attention_backend="flex"))
        flex.load_state_dict(ours.state_dict())
        sides.append(("t5forge-flex", flex))
    sides.append(("transformers-eager", hf))
    return [StepSide(n, copy.deepcopy(m) if n == "t5forge-sdpa" else m, device, args.precision, args.compile)
            for n, m in sides]


def stage_step(args, device, report):
    config, batch = shape_config("tiny" if args.dry_run else "base", "sdpa", 2 if args.dry_run else 128)
    if args.dry_run:
        config = toy(config, report)
    batches = report["data"]["pretrain"]
    S, T = batches[0]["input_ids"].shape[1], batches[0]["labels"].shape[1]
    flops = t5_flops_per_step(config, batch, S, T)
    out = {"shape": "t5-v1.1-base" if not args.dry_run else "toy", "batch": [batch, S, T],
           "data": report["data"]["source"], "compile": args.compile, "precision": args.precision, "sides": {}}
    for side in step_sides(args, device, config):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        entry = out["sides"].setdefault(side.name, {})
        t0 = time.perf_counter()
        losses = [side.step(batches[0])]  # warm-up / compile: step 0, untimed
        sync(device)
        entry["first_step_s"] = time.perf_counter() - t0
        for i in range(1, args.steps):
            sync(device)
            t0 = time.perf_counter()
            losses.append(side.step(batches[i % len(batches)]))
            sync(device)
            side.times.append(time.perf_counter() - t0)
        s = statistics.median(side.times[1:] or side.times)  # step 1 can still hold autotuning
        entry.update({"s_per_step": s, "tokens_per_s": batch * (S + T) / s,
                      "mfu_measured_peak": flops / s / report.get("peak_flops", float("nan")),
                      "mfu_datasheet": flops / s / DATASHEET_BF16,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
                      "losses": [float(x) for x in losses[:20]]})
        del side
    ref = out["sides"]["t5forge-sdpa"]["losses"]
    tol = 2e-2 if args.precision == "bf16" else 1e-3
    out["losses_agree"] = all(abs(a - b) <= tol * abs(b) + tol for s in out["sides"].values()
                              for a, b in zip(s["losses"], ref))
    if not out["losses_agree"]:
        out["status"], out["error"] = "failed", "losses differ between sides beyond bf16 noise"
    return out


def stage_profile(args, device, report):
    from torch.profiler import ProfilerActivity, profile

    config, batch = shape_config("tiny" if args.dry_run else "base", "sdpa", 2 if args.dry_run else 128)
    if args.dry_run:
        config = toy(config, report)
    torch.manual_seed(0)
    side = StepSide("t5forge-sdpa", T5(config), device, args.precision, args.compile)
    batches = report["data"]["pretrain"]
    for i in range(2):
        side.step(batches[i % len(batches)])  # compile and warm up outside the trace
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            side.step(batches[(i + 2) % len(batches)])
        sync(device)
    events = prof.key_averages()
    time_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, time_key, 0) or 0, reverse=True)[:15]
    syncs = {e.key: e.count // 2 for e in events if any(s in e.key for s in SYNC_EVENTS)}
    return {"steps_profiled": 2, "top": [{"name": e.key, "ms_per_step": (getattr(e, time_key, 0) or 0) / 2e3,
                                          "calls_per_step": e.count // 2} for e in top],
            "host_syncs_per_step": syncs, "host_syncs_total_per_step": sum(syncs.values())}


def stage_packing(args, device, report):
    from t5forge.train.loop import count_tokens

    sni = report["data"].get("sni")
    if not sni:
        return {"status": "skipped", "reason": "no SNI batches in the data file"}
    config, _ = shape_config("small" if not args.dry_run else "tiny", "sdpa")
    torch.manual_seed(0)
    model = T5(config)
    out = {"shape": "t5-v1.1-small" if not args.dry_run else "tiny", "layouts": {}}
    n = 2 if args.dry_run else len(sni["padded"])
    for layout in ("padded", "packed"):
        side = StepSide(layout, copy.deepcopy(model), device, args.precision, False)
        batches = sni[layout][:n]
        side.step(batches[0])
        times, tokens = [], []
        for b in batches[1:]:
            sync(device)
            t0 = time.perf_counter()
            side.step(b)
            sync(device)
            times.append(time.perf_counter() - t0)
            tokens.append(count_tokens(b))  # real tokens, padding excluded: the same in both layouts
        out["layouts"][layout] = {"tokens_per_s": sum(tokens) / sum(times), "steps": len(times)}
    out["speedup"] = out["layouts"]["packed"]["tokens_per_s"] / out["layouts"]["padded"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------ driver
def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.monotonic()
    out_path = Path(os.environ.get("OUT") or args.out) / "gpu_check.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {"environment": {"torch": torch.__version__, "device": torch.cuda.get_device_name()
                               if device.type == "cuda" else "cpu", "dry_run": args.dry_run}}
    report = {"data": load_data(args.data, args.dry_run, 512)}
    wanted = args.stages.split(",") if args.stages else list(STAGES)
    budgets = {"ceilings": 20, "attention": 60, "step": 240, "profile": 60, "packing": 40}

    def on_alarm(*_):
        raise Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    for name in STAGES:
        left = args.deadline_s - (time.monotonic() - start)
        if name not in wanted:
            results[name] = {"status": "skipped", "reason": "not in --stages"}
        elif left < (5 if args.dry_run else budgets[name] / 4):
            results[name] = {"status": "skipped", "reason": f"{left:.0f} s left of the deadline"}
        else:
            t0 = time.monotonic()
            signal.alarm(max(1, int(left)))
            try:
                entry = globals()[f"stage_{name}"](args, device, report)
                entry.setdefault("status", "ok")
            except Deadline:
                entry = {"status": "failed", "error": "global deadline reached inside the stage"}
            except Exception as e:  # noqa: BLE001 - a failed stage is reported; the next one still runs
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
            finally:
                signal.alarm(0)
            entry["seconds"] = round(time.monotonic() - t0, 1)
            results[name] = entry
        print(f"{name}: {results[name]['status']} {json.dumps(results[name], default=str)[:300]}", flush=True)
        out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at toy sizes")
    p.add_argument("--prepare-data", metavar="DIR", help="write DIR/gpu_check_data.pt (real batches) and exit")
    p.add_argument("--data", help="the file --prepare-data wrote (without: random ids, dry run only)")
    p.add_argument("--deadline-s", type=float, default=450)
    p.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--steps", type=int, default=None, help="steps per side in stage 3 (default 22; dry 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats in stage 2")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", default="benchmarks/results/gpu_check")
    args = p.parse_args(argv)
    if args.prepare_data:
        print(prepare_data(Path(args.prepare_data)))
        return None
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the device machine, or --dry-run on CPU")
    if not args.dry_run and not args.data:
        raise SystemExit("--data: the file `--prepare-data DIR` wrote (the device has no shared data)")
    args.precision = "fp32" if args.dry_run else "bf16"
    args.steps = args.steps or (4 if args.dry_run else 22)
    args.repeats = args.repeats or (3 if args.dry_run else 10)
    return run(args)


if __name__ == "__main__":
    main()
