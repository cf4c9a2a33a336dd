"""Training metrics: `metrics.jsonl`, optional TensorBoard, a progress bar, and FLOPs / MFU estimates.

`RUN_DIR/metrics.jsonl` holds one JSON object per line, e.g.

    {"step": 100, "kind": "train", "time": 1718000000.0, "loss": 3.21, "lr": 0.01, "grad_norm": 0.8,
     "seconds_per_step": 0.31, "tokens_per_s": 212000.0, "mfu": 0.41}
    {"step": 100, "kind": "eval", "time": 1718000010.0, "eval_loss": 3.05, "eval_accuracy": 0.41}

Non-finite numbers are written as null (strict JSON). Every line is flushed as written, so the file
is current even if the run is killed. A resumed run keeps the lines up to its checkpoint's step and
drops the later ones (and a last line cut short by a crash, with a warning), so the history reads
as one uninterrupted run; `eval_record(step)` tells the loop which evaluations it already holds.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from t5forge import run_layout
from t5forge.errors import T5ForgeError

METRICS_FILE = run_layout.METRICS


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: tensors and numpy scalars unwrapped, non-finite floats -> None."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl. A last line cut short by a crash is dropped; other bad lines raise."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was interrupted
                print(f"warning: {path}:{number}: ignoring an incomplete last line", file=sys.stderr)
                continue
            raise T5ForgeError(f"{path}:{number} is not a JSON object; fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise T5ForgeError(f'{path}:{number} must be a JSON object with an integer "step"')
        records.append(record)
    return records


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep only the records with step <= last_step (atomically rewritten); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


class MetricsLogger:
    """Writes metrics to `RUN_DIR/metrics.jsonl`, TensorBoard (`RUN_DIR/tensorboard/`), W&B and the console.

    `resume_step=None` starts a fresh history (an older metrics.jsonl is replaced); an integer keeps
    the records up to that step. `enabled=False` (ranks other than 0) makes every call a no-op.
    `wandb={"project": ..., "config": {...}}` also logs to Weights & Biases (see wandb_sink).
    The console shows a tqdm bar with ETA on a terminal, and one plain line per log call otherwise.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        *,
        resume_step: int | None = None,
        total_steps: int | None = None,
        progress: bool = True,
        enabled: bool = True,
        wandb: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = self._writer = self._bar = self._wandb = None
        self._evals: dict[int, dict] = {}  # step -> eval record kept from the history
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            # Also repairs a last line cut short by a crash (dropped with a warning).
            truncate_metrics(self.path, resume_step)
            if self.path.exists():
                self._evals = {r["step"]: r for r in read_metrics(self.path) if r.get("kind") == "eval"}
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise T5ForgeError(
                    "logging.tensorboard=true but TensorBoard is not installed: "
                    "pip install tensorboard, or set logging.tensorboard=false"
                ) from None
            # purge_step hides events written after the checkpoint we resume from (all of them
            # for a fresh start), matching what happens to metrics.jsonl.
            purge = 0 if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(Path(run_dir) / run_layout.TENSORBOARD), purge_step=purge)
        if wandb is not None:  # {"project": ..., "config": {...}}: see wandb_sink
            from t5forge.train.wandb_sink import WandbSink

            try:
                self._wandb = WandbSink(run_dir, **wandb, resume_step=resume_step)
            except BaseException:
                self.close()
                raise
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)
        self._console = progress

    def log(self, kind: str, step: int, **metrics: Any) -> dict:
        """Append one record; returns it as written."""
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({key: _plain(value) for key, value in metrics.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, int(step))
        if self._wandb is not None:
            self._wandb.log(record)
        self._show(record)
        return record

    def eval_record(self, step: int) -> dict | None:
        """The eval record of `step` in this history (kept on resume or written since), else None."""
        return self._evals.get(int(step))

    def log_train(self, step: int, **metrics: Any) -> dict:
        return self.log("train", step, **metrics)

    def log_eval(self, step: int, **metrics: Any) -> dict:
        record = self.log("eval", step, **metrics)
        self._evals[int(step)] = record
        return record

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (cheap; call every step for a smooth ETA)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def _show(self, record: dict) -> None:
        shown = {k: v for k, v in record.items() if k not in ("step", "kind", "time") and v is not None}
        if self._bar is not None:
            self.advance(record["step"])
            if record["kind"] == "train":
                self._bar.set_postfix_str(_short(shown, ("loss", "lr", "tokens_per_s")), refresh=False)
            else:
                self._bar.write(f"step {record['step']} {record['kind']}: {_short(shown)}")
        elif self._console:
            print(f"step {record['step']} {record['kind']}: {_short(shown)}", file=sys.stderr, flush=True)

    def close(self, exc: BaseException | None = None) -> None:
        """Close every sink; `exc` (what ended the run, if anything) marks the W&B run stopped or failed."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        wandb, self._file, self._writer, self._bar, self._wandb = self._wandb, None, None, None, None
        if wandb is not None:  # last: the local files are closed even if W&B fails to finish
            wandb.finish(exc, self._evals.values())

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(exc)


_SHORT_NAMES = {"tokens_per_s": "tok/s", "seconds_per_step": "s/step", "grad_norm": "gnorm"}


def _short(values: dict, keys=None) -> str:
    parts = []
    for key in keys or values:
        value = values.get(key)
        if value is None:
            continue
        name = _SHORT_NAMES.get(key, key)
        if isinstance(value, float):
            text = f"{value:.3g}" if key == "lr" else (f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}")
        else:
            text = str(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilisation (the FLOPs of a step: model/flops.py)


def estimate_mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak. Pass the summed peak of all devices."""
    if not peak_flops or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak_flops


# Dense (no structured sparsity) peak FLOP/s per device from vendor datasheets. First match wins,
# so specific names come before general ones. "fp32" is plain FP32, "tf32" FP32 matmuls on tensor
# cores (torch.set_float32_matmul_precision("high")).
_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100.*NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100|H200|H800|GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    (r"B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    (r"A100|A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
    (r"MI300X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12, "fp32": 163e12}),
    (r"MI250X", {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12}),
]


def _dtype_key(dtype: Any) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    key = names.get(dtype, str(dtype).lower().replace("float", "fp").replace("bfp16", "bf16"))
    if key == "fp32":
        tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
        return "tf32" if tf32 else "fp32"
    return key


def peak_flops(device: Any, dtype: Any) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in `dtype` ("bf16", "fp16", "fp32", "tf32" or a
    torch dtype); None when unknown (CPU, MPS, an unlisted GPU: measure with measure_matmul_flops).

    `device` is a torch.device, "cuda:0"-style string, or a GPU name like "NVIDIA H100 80GB HBM3".
    """
    if isinstance(device, torch.device) or re.fullmatch(r"(cpu|mps|cuda|xpu)(:\d+)?", str(device)):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    else:
        name = str(device)
    key = _dtype_key(dtype)
    for pattern, peaks in _PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks.get(key)
    return None


def measure_matmul_flops(device: Any = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on `device`: a practical peak where no datasheet applies."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)
