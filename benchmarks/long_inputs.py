"""Long inputs: peak memory and tokens/s of one forward + backward at 1k-16k encoder tokens,
t5forge (the converted model: speed twins, query-block attention above 2**21 pairs per row) against
transformers' T5ForConditionalGeneration built from the same config, with the same weights.

    taskset -c 0 python benchmarks/long_inputs.py                          # t5-v1.1-small, CPU
    python benchmarks/long_inputs.py --lengths 1024 2048 --sides t5forge   # a subset
    python benchmarks/long_inputs.py --device cuda --attention flex        # on a GPU (FlexAttention)

Every (side, length) point runs in a fresh process: build the model (model.name's architecture,
dropout 0, random weights from one seed, so both sides hold the same model), one warm-up forward +
backward at 256 tokens, then the peak-memory counter is reset (Linux clear_refs; CUDA's peak stats)
and ONE forward + backward of a batch of one random input of L tokens and 114 target tokens is
timed. tokens/s = (L + 114) / seconds; peak = the process's peak resident memory (VmHWM) during that
step (CPU) or torch.cuda.max_memory_allocated (GPU); "step" = peak minus the resident memory before
it (weights, gradients' buffers of the warm-up, the runtime). The loss of both sides at one length
is the same model on the same batch, so it is compared.

A point is not started when t5forge's estimate (t5forge.model.memory, the check `t5forge pretrain`
makes) exceeds the memory cap; a started point is stopped when its resident memory passes the cap
(the parent polls it). Either way the table says why, instead of the machine swapping or dying.

Writes benchmarks/results/long_inputs-<device>-<tag>.json and .md (--tag, default "run").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 114
GiB = 2**30


def point(side: str, length: int, device: str, attention: str, name: str) -> dict:
    """One measurement, in this process (the child)."""
    import torch

    from t5forge.ablation import peak_memory, reset_peak_memory
    from t5forge.model import fast
    from t5forge.model.config import T5Config
    from t5forge.model.hf import hf_to_t5forge_state_dict
    from t5forge.model.loss import TokenNLL
    from t5forge.model.t5 import T5
    import transformers

    config = T5Config.from_name(name, dropout_rate=0.0, attention_backend=attention)
    torch.manual_seed(0)
    hf_config = transformers.T5Config(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf = transformers.T5ForConditionalGeneration(hf_config)
    if side == "t5forge":
        model = T5(config)
        model.load_state_dict(hf_to_t5forge_state_dict(hf.state_dict(), config))
        del hf
        model, loss_fn, _ = fast.apply(model, TokenNLL(), device=device)

        def step(ids, labels):
            hidden = model(ids, labels=labels).hidden
            return loss_fn(*model.output_projection(hidden), labels) / labels.numel()
    else:
        model = hf

        def step(ids, labels):
            return model(input_ids=ids, labels=labels).loss
    model.to(device).train()

    def run(L, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, config.vocab_size, (1, L), generator=g).to(device)
        labels = torch.randint(2, config.vocab_size, (1, TARGET), generator=g).to(device)
        loss = step(ids, labels)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: the step's peak is the step's own
        return float(loss)

    run(256, 1)  # warm-up: kernels, allocator, gradient buffers
    if device == "cuda":
        torch.cuda.synchronize()
    rss_before = _rss_mib()
    reset_peak_memory()
    start = time.perf_counter()
    loss = run(length, 2)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = peak_memory()
    peak = memory.get("peak_cuda_mib", memory["peak_rss_mib"])
    return {"side": side, "length": length, "status": "ok", "seconds": round(seconds, 2),
            "tokens_per_s": round((length + TARGET) / seconds, 1), "peak_mib": peak,
            "before_mib": rss_before if device == "cpu" else None,
            "step_mib": round(peak - rss_before, 1) if device == "cpu" else peak, "loss": loss}


def _rss_mib(pid: str = "self") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def estimate_gib(side: str, length: int, attention: str, name: str) -> float:
    from t5forge.model.config import T5Config
    from t5forge.model.memory import estimate_step
    from t5forge.model.t5 import T5

    config = T5Config.from_name(name, dropout_rate=0.0, attention_backend=attention)
    import torch

    with torch.device("meta"):
        params = T5(config).num_parameters()
    blocked = None if side == "t5forge" else False  # transformers: always the dense bias
    est = estimate_step(config, params, 1, length, TARGET, optimizer_states=0, blocked=blocked)
    return est.total / GiB


def measure(side: str, length: int, args, cap_gib: float) -> dict:
    """The point in a fresh child process, its RSS polled and capped."""
    need = estimate_gib(side, length, args.attention, args.name)
    base = {"side": side, "length": length, "estimate_gib": round(need, 2)}
    if need > cap_gib:
        return {**base, "status": f"not run: estimated {need:.1f} GiB > cap {cap_gib:.1f} GiB"}
    cmd = [sys.executable, __file__, "--child", side, str(length), "--device", args.device,
           "--attention", args.attention, "--name", args.name]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start, top = time.monotonic(), 0.0
    while child.poll() is None:
        try:
            top = max(top, _rss_mib(str(child.pid)) / 1024)
        except (OSError, AttributeError):
            pass
        if top > cap_gib:
            child.kill()
            child.wait()
            return {**base, "status": f"stopped: resident memory passed the cap of {cap_gib:.1f} GiB"}
        if time.monotonic() - start > args.time_limit:
            child.kill()
            child.wait()
            return {**base, "status": f"stopped: over the time limit of {args.time_limit:.0f} s "
                                      f"(resident memory had reached {top:.2f} GiB)"}
        time.sleep(0.2)
    out, err = child.communicate()
    if child.returncode != 0:
        return {**base, "status": f"failed (exit {child.returncode}): {err.strip().splitlines()[-1] if err else ''}"}
    return {**base, **json.loads(out.strip().splitlines()[-1])}


def markdown(results: list[dict], args, cap_gib: float, header: dict) -> str:
    lines = [f"# Long inputs: forward + backward of {args.name}, batch 1, {TARGET} target tokens ({args.device})", "",
             f"- command: `{header['command']}`", f"- git: {header['git']}", f"- machine: {header['machine']}",
             f"- torch {header['torch']}, transformers {header['transformers']}; memory cap {cap_gib:.1f} GiB, "
             f"time limit {args.time_limit:.0f} s per point", "",
             "| input tokens | side | status | tokens/s | seconds | peak MiB | step MiB | estimate GiB | loss |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ok = r["status"] == "ok"
        lines.append(f"| {r['length']} | {r['side']} | {r['status']} | {r.get('tokens_per_s', '') if ok else ''} | "
                     f"{r.get('seconds', '') if ok else ''} | {r.get('peak_mib', '') if ok else ''} | "
                     f"{r.get('step_mib', '') if ok else ''} | {r['estimate_gib']} | "
                     f"{format(r['loss'], '.6f') if ok else ''} |")
    both = {}
    for r in results:
        if r["status"] == "ok":
            both.setdefault(r["length"], {})[r["side"]] = r["loss"]
    diffs = [f"{L}: {abs(s['t5forge'] - s['hf']):.2e}" for L, s in sorted(both.items()) if len(s) == 2]
    lines += ["", "|loss(t5forge) - loss(transformers)| where both ran: " + (", ".join(diffs) or "none"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--sides", nargs="+", default=["t5forge", "hf"], choices=["t5forge", "hf"])
    parser.add_argument("--name", default="google/t5-v1_1-small", help="model.name's architecture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", default="sdpa", help="t5forge's model.attention (sdpa, flex on a GPU)")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="memory cap per point (default: available memory less 2 GiB, at most 16)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per point before it is stopped")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(point(args.child[0], int(args.child[1]), args.device, args.attention, args.name)))
        return

    import torch
    import transformers

    from t5forge.model.memory import available_bytes

    cap = args.cap_gib if args.cap_gib is not None else min(available_bytes(torch.device(args.device)) / GiB - 2, 16.0)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    header = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "git": git + (" (with uncommitted changes)" if dirty else ""),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{torch.get_num_threads()} torch thread(s), affinity {sorted(os.sched_getaffinity(0))}",
              "torch": torch.__version__, "transformers": transformers.__version__}
    results = []
    for length in args.lengths:
        for side in args.sides:
            r = measure(side, length, args, cap)
            print(json.dumps(r), flush=True)
            results.append(r)
    out = REPO / "benchmarks" / "results" / f"long_inputs-{args.device}-{args.tag}"
    out.with_suffix(".json").write_text(json.dumps({"header": header, "cap_gib": cap, "results": results}, indent=2))
    out.with_suffix(".md").write_text(markdown(results, args, cap, header))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
