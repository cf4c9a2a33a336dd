"""Training-step throughput, model FLOP/s, MFU and peak memory: t5forge's T5 against transformers'
T5ForConditionalGeneration built from the same config, with the same weights, batch and precision.

    python benchmarks/train_throughput.py                             # tiny + t5-v1.1-small, CPU fp32
    python benchmarks/train_throughput.py --shapes base --rounds 3
    python benchmarks/train_throughput.py --device cuda --precision bf16 --shapes tiny small base
    python benchmarks/train_throughput.py --shapes small --profile    # + torch.profiler table per side
    python benchmarks/train_throughput.py --shapes num_heads=8,num_layers=6,num_decoder_layers=2,feed_forward_proj=gated-silu
                                                                      # t5-v1.1-small with these fields changed

t5forge's side is built as `t5forge pretrain` builds it: the plain model with its speed twins
swapped in by t5forge.model.fast.apply (and its TokenNLL twin as the loss).

One training step = forward with labels, backward, grad-norm clipping at 1.0, optimizer step,
zero_grad: what t5forge's loop does. Both sides use t5forge's AdamWScale (the nanoT5 recipe's
optimizer), so the ratio compares the models; the optimizer's share of the step is reported too.
The batch is one real span-corrupted C4 batch (T5 vocabulary, 512 input / 114 target tokens), or
random ids when the shared data folder is missing. Tokens per step = encoder input + decoder target
tokens. FLOPs per step come from t5forge.train.metrics_log.t5_flops_per_step, and MFU is measured
against the device's MEASURED matmul peak (the best of several square matmuls, before and after).

The two models run INTERLEAVED, one step each per round with the order alternating, so both see the
same machine load; the headline is the median over rounds of the per-round speed ratio. Warm-up
steps (allocator, compile) are not timed. Peak memory: torch.cuda.max_memory_allocated on GPU; on
CPU the peak RSS of a separate process running two steps of one side (model, grads, optimizer state
and activations, plus the Python/torch runtime of ~0.3 GB).

--flush-denormal sets torch.set_flush_denormal(True) for both sides, as `t5forge pretrain` does on
CPU. Where subnormal floats are slow (seen on an Intel Xeon with AVX-512: transformers' step 1.7-3.3x
slower without it, ours only in AdamWScale's step, as its cross-entropy makes no subnormal
probabilities), this is the fairer comparison.

Each side's step is also cut down to its matmul-like kernel calls, replayed one by one
(benchmarks/matmul_bound.py): "matmuls alone" is their summed time and "MFU bound" the MFU a step of
only that long would reach, so the tables show how much of the step is matmul and how much the rest.

Writes benchmarks/results/train_throughput-<device>-<precision>.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast import compiled as stretches
from t5forge.model.hf import hf_to_t5forge_state_dict
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5
from t5forge.optim.build import build_optimizer
from t5forge.model.flops import t5_flops_per_step
from t5forge.train.metrics_log import measure_matmul_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))  # matmul_bound, next to this file (also when imported)
from matmul_bound import record_matmuls, replay_times

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("T5FORGE_DATA", REPO.parent / "shared" / "data")).resolve()
INPUT_LENGTH, TARGET_LENGTH = 512, 114  # T5 span corruption at 15% noise, mean span 3


def shape_config(name: str, attention: str, batch: int | None = None) -> tuple[T5Config, int]:
    """(architecture, batch size) of a benchmark shape; dropout 0 as in nanoT5 pre-training.
    batch: overrides the shape's default batch size (nanoT5's pre-training batch is 128).
    name "field=value,field=value": t5-v1.1-small with those T5Config fields changed (batch 8)."""
    common = {"dropout_rate": 0.0, "attention_backend": attention}
    if "=" in name:
        fields = {f.name: f.type for f in T5Config.__dataclass_fields__.values()}
        overrides = {}
        for item in name.split(","):
            key, _, value = item.partition("=")
            if key not in fields:
                raise SystemExit(f"shape {name!r}: {key!r} is not a T5Config field")
            kind = str(fields[key])
            overrides[key] = (value.lower() in ("1", "true") if "bool" in kind else float(value) if "float" in kind
                              else value if "str" in kind else int(value))
        config, default = T5Config.from_name("google/t5-v1_1-small", **{**common, **overrides}), 8
    elif name == "tiny":
        config, default = T5Config(d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=4, **common), 16
    elif name == "small":
        config, default = T5Config.from_name("google/t5-v1_1-small", **common), 8
    elif name == "base":
        config, default = T5Config.from_name("google/t5-v1_1-base", **common), 8
    else:
        raise SystemExit(f"unknown shape {name!r}; use tiny, small, base or field=value,... (a t5-v1.1-small variant)")
    return config, batch or default


def real_batch(batch_size: int, vocab_size: int, seed: int = 0) -> tuple[dict, str]:
    """One span-corrupted C4 batch (input_ids, labels), or random ids if the data folder is missing."""
    files = [DATA / "c4-sample" / "c4-en.train-00000-first1000.json.gz"]
    spiece = DATA / "t5-spiece" / "spiece.model"
    if files[0].exists() and spiece.exists():
        from t5forge.data.loader import build_pretrain_loader

        loader = build_pretrain_loader(tokenizer=str(spiece), files=[str(f) for f in files], batch_size=batch_size,
                                       input_length=INPUT_LENGTH, seed=seed)
        batch = next(iter(loader))
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}, "C4 sample, T5 span corruption"
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, vocab_size, (batch_size, INPUT_LENGTH), generator=g),
            "labels": torch.randint(2, vocab_size, (batch_size, TARGET_LENGTH), generator=g)}, "random ids (no data)"


def build_pair(config: T5Config, hf_attention: str, seed: int = 0):
    """(ours, transformers') with identical weights. transformers >= 5 ties lm_head to the embedding
    at init; a v1.1 (untied) model gets its own lm_head so both train the same parameters."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.T5Config(**config.to_hf_dict())
    hf_config._attn_implementation = hf_attention
    hf = transformers.T5ForConditionalGeneration(hf_config)
    if not config.tie_word_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    ours = T5(config)
    ours.load_state_dict(hf_to_t5forge_state_dict(hf.state_dict(), config))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, f"parameter counts differ: ours {n_ours}, transformers {n_hf}"
    return ours, hf


def elementwise_compiled(elementwise: str, device, compile_mode: str, stream_elements: int) -> bool:
    """--elementwise resolved as `t5forge pretrain` resolves model.compile_elementwise (train/setup.py
    `training_model`): `stream_elements` is the batch's residual stream, batch x input length x d_model."""
    setting = None if elementwise == "auto" else elementwise == "compiled"
    return stretches.wanted(setting, device, compile_mode != "none", stream_elements)


class Trainer:
    """One side of the comparison: a model, its optimizer and a timed training step."""

    def __init__(self, name: str, model, batch: dict, device, precision: str, compile_mode: str,
                 elementwise: str = "auto"):
        self.name, self.device = name, device
        self.model = model.to(device).train()
        self.elementwise_compiled, self.loss_fn = False, None
        if isinstance(model, T5):  # the plain model with its twins, as pretrain builds it (train/setup.py)
            stream = batch["input_ids"].numel() * model.config.d_model
            self.elementwise_compiled = elementwise_compiled(elementwise, device, compile_mode, stream)
            _, self.loss_fn, _ = fast.apply(model, TokenNLL(), device=device, compiled=compile_mode != "none",
                                            elementwise=self.elementwise_compiled)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.n_targets = int((batch["labels"] != -100).sum())
        optim_cfg = SimpleNamespace(name="adamwscale", base_lr=2e-2, weight_decay=0.0)
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        self.forward = torch.compile(self.model) if compile_mode == "model" else self.model
        self.times: list[dict] = []

    def loss(self):
        with self.autocast():
            if isinstance(self.model, T5):  # t5forge's loop: summed NLL over the step's target count
                out = self.forward(**self.batch)
                nll = self.loss_fn(*self.model.output_projection(out.hidden), self.batch["labels"])
                return nll / self.n_targets
            return self.forward(**self.batch).loss

    def step(self, record: bool = True) -> float:
        clock = _Clock(self.device)
        loss = self.loss()
        loss.backward()
        clock.mark("model")
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        if record:
            self.times.append(clock.seconds())
        return float(loss.detach())


class _Clock:
    """Wall time of consecutive phases; CUDA events on GPU so the phases need no host sync."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = [("start", self._now())]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def seconds(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) / 1e3 if self.cuda else b - a
        out["step"] = sum(out.values())
        return out


def matmul_peak(device, dtype) -> float:
    """The best FLOP/s of square matmuls: the practical peak MFU is measured against."""
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    return max(measure_matmul_flops(device, dtype, size=s, repeats=3 if device.type == "cpu" else 20) for s in sizes)


def cpu_peak_memory(args, shape: str, side: str) -> int:
    """Peak RSS (bytes) of a fresh process training `side` for two steps (optimizer state included)."""
    cmd = [sys.executable, __file__, "--memory-probe", side, "--shapes", shape, "--precision", args.precision,
           "--attention", args.attention, "--hf-attention", args.hf_attention, "--compile", args.compile,
           "--elementwise", args.elementwise]
    if args.flush_denormal:
        cmd.append("--flush-denormal")
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_rss"])


def memory_probe(args) -> None:
    config, batch_size = shape_config(args.shapes[0], args.attention, args.batch)
    batch, _ = real_batch(batch_size, config.vocab_size)
    ours, hf = build_pair(config, args.hf_attention)
    model = ours if args.memory_probe == "t5forge" else hf
    del ours, hf  # only `model` stays alive
    trainer = Trainer(args.memory_probe, model, batch, torch.device("cpu"), args.precision,
                      args.compile if args.memory_probe == "t5forge" else "none", args.elementwise)
    for _ in range(2):
        trainer.step(record=False)
    print(json.dumps({"peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork + exec, so a child would report the benchmark process's own peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment(device) -> dict:
    import transformers

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hardware = line.split(":", 1)[1].strip()
                    break
        hardware += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"git_sha": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
            "hardware": hardware, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def busy_processes() -> list[str]:
    """Other processes using CPU right now (the machine may be shared): what else was running."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines()[1:]:
            pid, pcpu, cmd = line.split(None, 2)
            if int(pid) != os.getpid() and float(pcpu) >= 20:
                rows.append(f"{float(pcpu):.0f}% {cmd[:120]}")
        return rows
    return []


def bench_shape(args, shape: str, device, peak: float) -> dict:
    config, batch_size = shape_config(shape, args.attention, args.batch)
    batch, source = real_batch(batch_size, config.vocab_size)
    tokens = batch["input_ids"].numel() + int((batch["labels"] != -100).sum())
    flops = t5_flops_per_step(config, batch_size, INPUT_LENGTH, batch["labels"].shape[1])
    ours, hf = build_pair(config, args.hf_attention)
    sides = [Trainer("t5forge", ours, batch, device, args.precision, args.compile, args.elementwise),
             Trainer("transformers", hf, batch, device, args.precision, args.hf_compile)]
    first_loss = {}
    for _ in range(args.warmup):
        for side in sides:
            first_loss.setdefault(side.name, side.step(record=False))
    # Same weights and batch: the first losses must agree, or the comparison would be meaningless.
    a, b = first_loss["t5forge"], first_loss["transformers"]
    tol = 1e-3 if args.precision == "fp32" else 3e-2
    if abs(a - b) > tol * abs(b):
        raise SystemExit(f"{shape}: first-step losses differ: t5forge {a:.6f}, transformers {b:.6f}")
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side.step()
            if args.verbose:
                print(f"  {shape} round {r} {side.name}: {side.times[-1]['step']:.3f} s", file=sys.stderr)
    result = {"shape": shape, "batch_size": batch_size, "input_length": INPUT_LENGTH,
              "target_length": batch["labels"].shape[1], "tokens_per_step": tokens, "flops_per_step": flops,
              "config": config.to_json_dict(), "batch": source, "first_loss": first_loss,
              "elementwise_compiled": sides[0].elementwise_compiled, "sides": {}}
    for side in sides:
        med = {k: statistics.median(t[k] for t in side.times) for k in ("step", "model", "optimizer")}
        result["sides"][side.name] = {
            "step_seconds": side.times, "median_step_s": med["step"], "median_model_s": med["model"],
            "median_optimizer_s": med["optimizer"], "tokens_per_s": tokens / med["step"],
            "flops_per_s": flops / med["step"], "mfu": flops / med["step"] / peak,
            "model_mfu": flops / med["model"] / peak,
        }
    ours_t, hf_t = (s.times for s in sides)
    result["speedup"] = statistics.median(h["step"] / o["step"] for o, h in zip(ours_t, hf_t))
    result["model_speedup"] = statistics.median(h["model"] / o["model"] for o, h in zip(ours_t, hf_t))
    # Load from other processes only ever slows a step down: the best times are the least disturbed.
    result["speedup_best"] = min(h["step"] for h in hf_t) / min(o["step"] for o in ours_t)
    for side in sides:  # the matmuls alone (not under torch.compile, whose kernels a dispatch mode cannot time)
        compiled = (args.compile if side.name == "t5forge" else args.hf_compile) != "none"
        result["sides"][side.name]["matmul_bound_s"] = None if compiled else matmul_seconds(side, device)
    if args.profile:
        result["profile"] = {s.name: profile_step(s) for s in sides}
    del sides, ours, hf
    if args.memory:
        for name in ("t5forge", "transformers"):
            if device.type == "cuda":
                result["sides"][name]["peak_memory_bytes"] = cuda_peak_memory(args, shape, name, device)
            else:
                result["sides"][name]["peak_memory_bytes"] = cpu_peak_memory(args, shape, name)
    return result


def matmul_seconds(side: Trainer, device) -> float | None:
    """The step's matmul-like calls replayed alone (matmul_bound.py), or None where a kernel cannot be
    replayed outside its step: a diagnostic column must not cost the run's other figures."""
    try:
        return sum(replay_times(record_matmuls(functools.partial(side.step, False)), device))
    except Exception as err:  # noqa: BLE001  (any kernel's refusal; reported, not raised)
        print(f"{side.name}: matmuls-alone replay skipped: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def cuda_peak_memory(args, shape: str, side: str, device) -> int:
    config, batch_size = shape_config(shape, args.attention, args.batch)
    batch, _ = real_batch(batch_size, config.vocab_size)
    ours, hf = build_pair(config, args.hf_attention)
    model = ours if side == "t5forge" else hf
    trainer = Trainer(side, model, batch, device, args.precision,
                      args.compile if side == "t5forge" else args.hf_compile, args.elementwise)
    trainer.step(record=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    trainer.step(record=False)
    return torch.cuda.max_memory_allocated(device)


def profile_step(side: Trainer, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        side.step(record=False)
    key = "self_cuda_time_total" if side.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _or_dash(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _elementwise_words(compiled) -> str:
    """'compiled' / 'eager', or per shape when they differ (older reports hold one bool)."""
    if isinstance(compiled, dict):
        if len(set(compiled.values())) > 1:
            return ", ".join(f"{shape} {'compiled' if on else 'eager'}" for shape, on in compiled.items())
        compiled = all(compiled.values())
    return "compiled" if compiled else "eager"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Training throughput: t5forge vs transformers ({report['device']}, {report['precision']})", "",
             f"Command: `python {env['command']}`", "",
             (f"- hardware: {env['hardware']}; measured {report['precision']} matmul peak "
             f"{report['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s (best of {report['matmul_peak_all']})"),
             (f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; "
             f"git {env['git_sha'][:12]}{' + uncommitted changes' if env['uncommitted_changes'] else ''}"),
             (f"- t5forge attention `{report['attention']}`, compile `{report['compile']}`, elementwise stretches "
              f"{_elementwise_words(report.get('elementwise_compiled'))}; transformers attention "
             f"`{report['hf_attention']}`, compile `{report['hf_compile']}`; optimizer AdamWScale on both; "
             f"subnormals {'flushed to zero' if report.get('flush_denormal') else 'kept (torch default)'}"),
             (f"- {report['rounds']} interleaved rounds after {report['warmup']} warm-up step(s); "
             f"load average {report['load_average_start']} at start, {report['load_average_end']} at end"),
             "", ("| shape | side | tokens/s | step s | fwd+bwd s | optimizer s | GFLOP/s | MFU | matmuls alone s "
                  "| MFU bound | peak mem | speed-up |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in report["results"]:
        for name, side in res["sides"].items():
            mem = side.get("peak_memory_bytes")
            ratio = (f"**{res['speedup']:.2f}x** (best/best {res['speedup_best']:.2f}x, fwd+bwd "
                     f"{res['model_speedup']:.2f}x)") if name == "t5forge" else ""
            lines.append(
                f"| {res['shape']} (B={res['batch_size']}, {res['input_length']}/{res['target_length']}) | {name} "
                f"| {side['tokens_per_s']:,.0f} | {side['median_step_s']:.3f} | {side['median_model_s']:.3f} "
                f"| {side['median_optimizer_s']:.3f} | {side['flops_per_s'] / 1e9:,.1f} | {side['mfu']:.1%} "
                f"| {_or_dash(side.get('matmul_bound_s'), '.3f')} | {_or_dash(side.get('mfu_bound'), '.1%')} "
                f"| {'-' if mem is None else f'{mem / 2**30:.2f} GiB'} | {ratio} |")
    lines += ["", "speed-up: median over rounds of (transformers step time / t5forge step time) in the same round; "
              "best/best: fastest transformers step over fastest t5forge step. tokens/s, step and MFU use the "
              "median step time; MFU = model FLOPs (t5_flops_per_step) per second over the measured matmul peak. "
              "matmuls alone: the step's matmul-like kernel calls (mm, bmm, fused SDPA; forward and backward) "
              "replayed one by one on fresh tensors of the same layout (benchmarks/matmul_bound.py); MFU bound: "
              "the MFU of a step that took only that long. "
              "Peak memory: " + ("torch.cuda.max_memory_allocated." if report["device"] == "cuda" else
                                 "peak RSS of a separate process training one side for two steps.")]
    for when in ("start", "end"):
        if report.get(f"busy_processes_{when}"):
            lines += ["", f"Other processes busy at {when} (ps %CPU over each process's life):", ""] + [f"- `{p}`" for p in report[f"busy_processes_{when}"]]
    for res in report["results"]:
        for name, table in res.get("profile", {}).items():
            lines += ["", f"## Profile: {res['shape']}, {name}", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"], help="tiny | small | base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", default="sdpa", help="t5forge attention back end")
    parser.add_argument("--hf-attention", default="sdpa", help="transformers attn_implementation")
    parser.add_argument("--compile", choices=("none", "model"), default="none", help="torch.compile t5forge's model")
    parser.add_argument("--hf-compile", choices=("none", "model"), default="none")
    parser.add_argument("--elementwise", choices=("auto", "compiled", "eager"), default="auto",
                        help="t5forge's residual adds, norms and gated activations (model.compile_elementwise): "
                             "auto = as t5forge pretrain does (compiled on CPU unless --compile model)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every shape (default: 16 at tiny, 8 at small and base)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) for both sides (subnormals -> 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table per side")
    parser.add_argument("--out", default=None, help="output path without extension")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--memory-probe", choices=("t5forge", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("--flush-denormal: this CPU does not support flushing subnormals")
    if args.memory_probe:
        return memory_probe(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the peak is measured
    report = {"device": device.type, "precision": args.precision, "attention": args.attention,
              "hf_attention": args.hf_attention, "compile": args.compile, "hf_compile": args.hf_compile,
              "elementwise": args.elementwise,
              "flush_denormal": args.flush_denormal, "rounds": args.rounds, "warmup": args.warmup,
              "environment": environment(device),
              "busy_processes_start": busy_processes(), "load_average_start": round(os.getloadavg()[0], 2)}
    peaks = [matmul_peak(device, dtype)]
    report["results"] = []
    for shape in args.shapes:
        print(f"{shape} ...", file=sys.stderr)
        report["results"].append(bench_shape(args, shape, device, peaks[0]))
    # Resolved per shape (the residual stream's size decides under --elementwise auto), as pretrain does.
    report["elementwise_compiled"] = {res["shape"]: res["elementwise_compiled"] for res in report["results"]}
    peaks.append(matmul_peak(device, dtype))
    peak = max(peaks)
    for res in report["results"]:  # MFU against the best peak seen over the whole run
        for side in res["sides"].values():
            side["mfu"] = side["flops_per_s"] / peak
            side["model_mfu"] = res["flops_per_step"] / side["median_model_s"] / peak
            bound = side.get("matmul_bound_s")
            side["mfu_bound"] = None if bound is None else res["flops_per_step"] / bound / peak
    report.update(matmul_peak_flops=peak, matmul_peak_all=[f"{p / 1e9:.1f}" for p in peaks],
                  load_average_end=round(os.getloadavg()[0], 2), busy_processes_end=busy_processes())
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"train_throughput-{device.type}-{args.precision}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
