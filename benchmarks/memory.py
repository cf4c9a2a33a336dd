"""Peak memory of a training step: T5 shapes x activation checkpointing x data parallelism.

    python benchmarks/memory.py                                      # CPU: small, base, large; none/full
    python benchmarks/memory.py --shapes small --modes none full selective --strategies single ddp fsdp
    python benchmarks/memory.py --device cuda --shapes small base large --batch 32
    python benchmarks/memory.py --shapes tiny --steps 1 --out /tmp/memory   # a smoke run, seconds

Every arm runs in a fresh process (two under `torch.distributed.run` for ddp / fsdp, gloo on CPU,
NCCL on CUDA), built the way `t5forge pretrain` builds a run: T5Config.from_name (dropout 0, nanoT5's
pre-training), the speed twins and model.activation_checkpointing (train/setup.py training_model,
which also wraps DDP or shards with FSDP2), the default AdamWScale (train/loop.py train_step: forward,
backward, clipping, optimizer step), on random ids of nanoT5's lengths (512 input, 114 target
tokens; the values do not change the memory of a dense model). `--steps` steps (default 2: the
optimizer's state is allocated in the first, so the second is a steady-state step).

Measured per process (for ddp / fsdp: the largest of the two ranks; the machine holds both):
  CPU   peak RSS (VmHWM) over the whole process: weights, gradients, optimizer state, activations,
        plus the Python / torch runtime (`runtime`: RSS after import, before the model is built);
        `before step`: RSS when everything but the first step exists (weights on the device).
  CUDA  torch.cuda.max_memory_allocated (the caching allocator's reserve on top is not counted).

An arm is skipped, with the reason in the table, when the machine's available memory (MemAvailable)
is below an estimate of what it needs (16 bytes a parameter per rank, fp32 weights, gradient and
Adam's two moments, plus a margin), or when distributed.strategy=fsdp is not a config key of this
t5forge. Writes benchmarks/results/memory-<device>[-tag].json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
INPUT_LENGTH, TARGET_LENGTH = 512, 114  # nanoT5's: T5 span corruption at 15% noise, mean span 3
SHAPES = {"tiny": "tiny", "small": "google/t5-v1_1-small", "base": "google/t5-v1_1-base",
          "large": "google/t5-v1_1-large"}
GiB = 1 << 30


def rss_now() -> int:
    return _status_field("VmRSS")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's over across fork + exec)."""
    return _status_field("VmHWM")


def _status_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {name}")


# ---------------------------------------------------------------------------------------------
# One arm, in its own process (or one of two ranks).


def probe(args) -> None:
    runtime = rss_now()
    from t5forge.config_files import load_config
    from t5forge.distributed import init_world, shutdown
    from t5forge.model.t5 import T5
    from t5forge.optim.build import build_optimizer
    from t5forge.train.loop import train_step
    from t5forge.train.setup import autocast_for, enable_fast_math, training_model
    from t5forge.model.config import T5Config

    device = torch.device(args.device)
    world = init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // world.world_size))
    enable_fast_math(device)
    overrides = [f"model.name={SHAPES[args.shape]}", f"model.activation_checkpointing={args.mode}",
                 "model.compile=false", f"precision={args.precision}", f"device={args.device}"]
    if args.strategy == "fsdp":  # ddp is what torchrun gives without the key
        overrides.append(f"distributed.strategy={args.strategy}")
    cfg = load_config(overrides)
    torch.manual_seed(0)
    model = T5(T5Config.from_name(SHAPES[args.shape], dropout_rate=0.0)).to(device)
    training, loss_fn = training_model(model, cfg, world, device)
    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(world.rank)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(2, vocab, (args.batch, INPUT_LENGTH), generator=g),
             "labels": torch.randint(2, vocab, (args.batch, TARGET_LENGTH), generator=g)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_now()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(training, optimizer, [batch], 1e-3, grad_clip=1.0, device=device, world=world,
                   autocast=autocast_for(cfg.precision, device), loss_fn=loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    result = {"rank": world.rank, "peak": peak_rss(), "before_step": before, "runtime": runtime,
              "step_seconds": seconds, "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
    shutdown(world)
    Path(args.result_dir, f"rank-{world.rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver: one fresh process (group) per arm.


def parameters_of(shape: str) -> int:
    from t5forge.model.config import T5Config
    from t5forge.model.t5 import T5

    with torch.device("meta"):
        return T5(T5Config.from_name(SHAPES[shape])).num_parameters()


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def has_fsdp() -> bool:
    from t5forge.config import is_key

    return is_key("distributed.strategy")


def skip_reason(args, shape: str, strategy: str) -> str | None:
    if strategy == "fsdp" and not has_fsdp():
        return "distributed.strategy is not a config key of this t5forge (no FSDP here)"
    if args.device != "cpu":
        return None
    ranks = 1 if strategy == "single" else 2
    # fp32 weights, gradients and Adam's two moments per rank (fsdp: sharded, but the gathered
    # block and the DDP-like buckets bring it close), + the activations' rough share and the runtime
    need = ranks * (16 * parameters_of(shape) + int(0.6 * GiB)) * (1 if strategy != "fsdp" else 0.75)
    free = available_memory()
    if need > free * 0.9:
        return f"needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB available"
    return None


def run_arm(args, shape: str, mode: str, strategy: str) -> dict:
    arm = {"shape": shape, "mode": mode, "strategy": strategy, "batch": args.batch}
    reason = skip_reason(args, shape, strategy)
    if reason:
        print(f"skip {shape} / {mode} / {strategy}: {reason}", flush=True)
        return {**arm, "skipped": reason}
    results = Path(tempfile.mkdtemp(prefix="t5forge-memory-"))
    own = [__file__, "--probe", "--result-dir", str(results), "--shape", shape, "--mode", mode, "--strategy", strategy, "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, "--precision", args.precision]
    if strategy == "single":
        cmd = [sys.executable, *own]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *own]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "OMP_NUM_THREADS":
           os.environ.get("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // (1 if strategy == "single" else 2))))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    ranks = [json.loads(f.read_text()) for f in sorted(results.glob("rank-*.json"))]
    shutil.rmtree(results, ignore_errors=True)
    if done.returncode != 0 or len(ranks) != (1 if strategy == "single" else 2):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"FAILED {shape} / {mode} / {strategy}: {tail[0]}", flush=True)
        return {**arm, "failed": tail[0]}
    top = max(ranks, key=lambda r: r["peak"])
    result = {**arm, "peak": top["peak"], "before_step": top["before_step"], "runtime": top["runtime"],
              "parameters": top["parameters"], "threads": top["threads"],
              "step_seconds": [min(r["step_seconds"][i] for r in ranks) for i in range(args.steps)],
              "ranks": ranks, "wall_seconds": round(time.perf_counter() - start, 1)}
    print(f"{shape} / {mode} / {strategy}: peak {result['peak'] / GiB:.2f} GiB "
          f"(before step {result['before_step'] / GiB:.2f}), last step {result['step_seconds'][-1]:.1f} s", flush=True)
    return result


def environment(args) -> dict:
    def git(*a):
        with contextlib.suppress(OSError):
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
        return "?"

    hardware = platform.machine()
    if args.device == "cuda":
        hardware = torch.cuda.get_device_name(0)
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hardware = line.split(":", 1)[1].strip()
                    break
        mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
        hardware += f", {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {mem / GiB:.0f} GiB"
    return {"git_sha": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "--", ".", ":!benchmarks/results")),
            "hardware": hardware, "python": platform.python_version(), "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def markdown(report: dict) -> str:
    env = report["environment"]
    cpu = report["device"] == "cpu"
    lines = [f"# Peak memory of a training step ({report['device']}, {report['precision']})", "",
             f"- command: `{env['command']}`", f"- git sha: {env['git_sha']}"
             + (" (with uncommitted changes)" if env["uncommitted_changes"] else ""),
             f"- machine: {env['hardware']}; torch {env['torch']}, python {env['python']}",
             f"- step: forward + backward + clip + AdamWScale step, {report['steps']} steps, batch "
             f"{report['batch']} x {INPUT_LENGTH}/{TARGET_LENGTH} tokens per rank; ddp / fsdp: 2 ranks on this machine, "
             "the larger rank's figure",
             "- peak: " + ("peak RSS of the process (VmHWM), runtime included; before step: RSS with weights built, "
                           "no step taken yet" if cpu else "torch.cuda.max_memory_allocated"), "",
             "| shape | params | activation checkpointing | strategy | peak GiB | before step GiB | step s |",
             "|---|---:|---|---|---:|---:|---:|"]
    for arm in report["arms"]:
        head = f"| {arm['shape']} | {_params(arm)} | {arm['mode']} | {arm['strategy']} |"
        if "skipped" in arm or "failed" in arm:
            lines.append(f"{head} {'skipped' if 'skipped' in arm else 'failed'}: {arm.get('skipped', arm.get('failed'))} | | |")
        else:
            lines.append(f"{head} {arm['peak'] / GiB:.2f} | {arm['before_step'] / GiB:.2f} | "
                         f"{arm['step_seconds'][-1]:.1f} |")
    return "\n".join(lines) + "\n"


def _params(arm) -> str:
    n = arm.get("parameters") or parameters_of(arm["shape"])
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small", "base", "large"], choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["none", "full"], choices=["none", "full", "selective"],
                   help="model.activation_checkpointing values")
    p.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp"], choices=["single", "ddp", "fsdp"],
                   help="single = one process; ddp / fsdp = 2 ranks (fsdp skipped where the key is unknown)")
    p.add_argument("--batch", type=int, default=4, help="examples per rank")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--timeout", type=float, default=900, help="seconds per arm")
    p.add_argument("--out", help="output prefix (default benchmarks/results/memory-<device>[-<tag>])")
    p.add_argument("--tag", default="")
    # one arm, in its own process (the driver calls these)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    arms = [run_arm(args, shape, mode, strategy)
            for shape in args.shapes for strategy in args.strategies for mode in args.modes]
    report = {"device": args.device, "precision": args.precision, "batch": args.batch, "steps": args.steps,
              "environment": environment(args), "arms": arms}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"memory-{args.device}" + (f"-{args.tag}" if args.tag else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if any("failed" in arm for arm in arms):
        sys.exit(1)


if __name__ == "__main__":
    main()
