"""`t5forge ablate`: the spec (base overrides, a budget, the arms), each arm's state on disk, and the
results (per-arm summary, results.json, results.md, curves.png).

A spec is a YAML file:

    base: [task=pt_cpu, data.train_files=[...], ...]   # pretrain overrides every arm shares
    budget: 5m                                          # per arm: a duration (optim.time_budget) or a
                                                        # step count (an int: optim.total_steps)
    arms:                                               # name -> its own overrides
      baseline: []
      squared_relu: [model.feed_forward=squared_relu]

Every arm trains into OUT/ARM with the same data, seed and evaluation settings (arms may not set
data.*, eval.*, seed, task or config), so their held-out NLLs are measured on the same batches.
OUT/ARM/ablate-arm.json records what the arm was run with and whether it finished: a finished arm
is not rerun, an unfinished one resumes (resume=auto), and one run with a different spec is refused.
Under a duration budget an arm stops when the time or base's optim.total_steps (the schedule's
length; the preset's when unset) runs out, whichever comes first: set total_steps high enough that
the time decides.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from t5forge.durations import format_seconds, parse_time_budget
from t5forge.errors import T5ForgeError
from t5forge.run_layout import METRICS, MODEL_CONFIG, MODEL_WEIGHTS, newest_model_checkpoint

TOP_KEYS = ("base", "budget", "arms")
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Set by the ablation itself, for every arm alike.
OWNED = {"out_dir": "--out DIR", "resume": "the ablation (resume=auto)", "stop_at_step": "the ablation",
         "optim.total_steps": "budget:", "optim.time_budget": "budget:"}
# What makes the arms comparable: the same data, seed and held-out batches.
SHARED_KEYS = ("seed", "task", "config")
SHARED_SECTIONS = ("data.", "eval.")

ARM_FILE = "ablate-arm.json"
RESULTS_JSON, RESULTS_MD, CURVES = "results.json", "results.md", "curves.png"


@dataclass(frozen=True)
class Budget:
    text: str
    steps: int | None = None
    seconds: float | None = None

    def items(self) -> list[str]:
        if self.steps is not None:
            return [f"optim.total_steps={self.steps}"]
        return [f"optim.time_budget={self.text}"]

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{format_seconds(self.seconds)} of training"


@dataclass(frozen=True)
class Spec:
    path: Path
    base: tuple[str, ...]
    budget: Budget
    arms: dict  # name -> tuple of overrides, in the file's order

    def items(self, arm: str, out: Path) -> list[str]:
        """The pretrain items of one arm: base < budget < arm < where it runs."""
        return [*self.base, *self.budget.items(), *self.arms[arm], f"out_dir={out / arm}", "resume=auto"]

    def fingerprint(self, arm: str) -> dict:
        return {"base": list(self.base), "budget": self.budget.text, "overrides": list(self.arms[arm])}


def _overrides(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise T5ForgeError(f"{where} must be a list of KEY=VALUE overrides, e.g. [model.feed_forward=squared_relu]; "
                           f"got {value!r}")
    items = tuple(str(v) for v in value)
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise T5ForgeError(f"{where}: {item!r} is not KEY=VALUE (e.g. model.feed_forward=squared_relu)")
    return items


def _parse_budget(value, where: str) -> Budget:
    if isinstance(value, bool) or value is None:
        raise T5ForgeError(f"{where} is required: a duration per arm (5m, 1h30m) or a step count (an integer)")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        steps = int(value)
        if steps < 1:
            raise T5ForgeError(f"{where}={value!r}: a step budget must be >= 1")
        return Budget(str(steps), steps=steps)
    if not isinstance(value, str):
        raise T5ForgeError(f"{where}={value!r}: write a duration (5m, 1h30m) or a step count (an integer)")
    seconds = parse_time_budget(value, key=where)
    if seconds is None:
        raise T5ForgeError(f"{where} is empty: an ablation needs a budget per arm (5m, 1h30m, or a step count)")
    return Budget(value.strip(), seconds=seconds)


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec's shape (its overrides are checked against the config by `arm_configs`)."""
    path = Path(path)
    if not path.is_file():
        raise T5ForgeError(f"ablation spec {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise T5ForgeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise T5ForgeError(f"{path}: an ablation spec is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [str(k) for k in data if k not in TOP_KEYS]
    if unknown:
        raise T5ForgeError(f"{path}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(TOP_KEYS)}")
    base = _overrides(data.get("base"), f"{path}: base")
    budget = _parse_budget(data.get("budget"), f"{path}: budget")
    for item in base:
        key = item.partition("=")[0].strip()
        # Under a time budget, optim.total_steps stays the base's: the schedule's length and the step
        # cap (a run stops at whichever of the two ends first, as `t5forge pretrain` does).
        if key in OWNED and not (key == "optim.total_steps" and budget.seconds is not None):
            raise T5ForgeError(f"{path}: base sets {key}, which {OWNED[key]} sets for every arm; remove it")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise T5ForgeError(f"{path}: arms must name at least one arm, e.g. arms: {{baseline: [], "
                           f"squared_relu: [model.feed_forward=squared_relu]}}")
    parsed = {}
    for name, value in arms.items():
        if not isinstance(name, str) or not ARM_NAME.match(name):
            raise T5ForgeError(f"{path}: arm name {name!r} cannot be a directory name; use letters, digits, "
                               f"- and _ (at most 64, starting with a letter or digit)")
        items = _overrides(value, f"{path}: arms.{name}")
        for item in items:
            key = item.partition("=")[0].strip()
            if key in OWNED:
                raise T5ForgeError(f"{path}: arms.{name} sets {key}, which {OWNED[key]} sets for every arm")
            if key in SHARED_KEYS or key.startswith(SHARED_SECTIONS):
                raise T5ForgeError(f"{path}: arms.{name} sets {key}; every arm shares the data, seed and held-out "
                                   f"evaluation (set it in base: instead)")
        parsed[name] = items
    return Spec(path, base, budget, parsed)


def arm_configs(spec: Spec, out: Path) -> dict:
    """Each arm's resolved RunConfig, all checked before any arm runs."""
    from t5forge.config_files import load_config, with_run_dir

    configs = {}
    for name in spec.arms:
        try:
            cfg = load_config(spec.items(name, out))
        except T5ForgeError as err:
            raise T5ForgeError(f"{spec.path}: arm {name}: {err}") from None
        if cfg.mode != "pt":
            raise T5ForgeError(f"{spec.path}: arm {name} resolves to a fine-tuning config (mode={cfg.mode}); "
                               f"an ablation pre-trains (use a pt task in base:)")
        configs[name] = with_run_dir(cfg, "pretrain")
    return configs


def arm_status(arm_dir: Path, fingerprint: dict) -> str:
    """'done', 'partial' (resume it) or 'new'; refuses a directory another spec or command wrote."""
    marker = arm_dir / ARM_FILE
    if not marker.is_file():
        if arm_dir.exists() and any(arm_dir.iterdir()):
            raise T5ForgeError(f"{arm_dir} holds files that t5forge ablate did not write (no {ARM_FILE}); "
                               f"choose another --out or move it away")
        return "new"
    recorded = json.loads(marker.read_text())
    if recorded.get("spec") != fingerprint:
        raise T5ForgeError(f"{arm_dir} was trained with another spec ({recorded.get('spec')}, now {fingerprint}); "
                           f"delete {arm_dir} to rerun that arm, or choose another --out")
    return "done" if recorded.get("finished") else "partial"


def write_arm_marker(arm_dir: Path, fingerprint: dict, finished: bool, memory: dict | None = None) -> None:
    arm_dir.mkdir(parents=True, exist_ok=True)
    record = {"spec": fingerprint, "finished": finished, "memory": memory or {}}
    tmp = arm_dir / (ARM_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(arm_dir / ARM_FILE)


def reset_peak_memory() -> None:
    """Reset the process's peak RSS (Linux: clear_refs 5) and CUDA's peak, so the next arm reads its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_memory then reports the process's peak so far
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak memory since `reset_peak_memory`, in MiB, and what the number measures."""
    memory = {}
    try:
        status = Path("/proc/self/status").read_text()
        memory["peak_rss_mib"] = round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)
        memory["rss_measures"] = "peak resident memory of the ablate process during this arm (VmHWM, reset per arm)"
    except (OSError, AttributeError):
        import resource

        memory["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        memory["rss_measures"] = "peak resident memory of the ablate process so far (ru_maxrss; includes earlier arms)"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def _latest_records(records: list[dict], kind: str) -> list[dict]:
    """One record per step of `kind`, the last written (a resumed run may repeat steps after its checkpoint)."""
    by_step = {r["step"]: r for r in records if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def _parameters(arm_dir: Path) -> tuple[int | None, int | None]:
    """(parameters, active parameters: those one token uses, model/moe.py) of the arm's newest checkpoint."""
    checkpoint = newest_model_checkpoint(arm_dir)
    if checkpoint is None:
        return None, None
    from safetensors import safe_open

    from t5forge.model.config import T5Config
    from t5forge.model.moe import active_parameters

    with safe_open(str(checkpoint / MODEL_WEIGHTS), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = T5Config.from_json_file(checkpoint / MODEL_CONFIG)
    return sum(math.prod(s) for s in shapes.values()), active_parameters(shapes, config)


def summarize(name: str, arm_dir: Path, overrides: tuple[str, ...]) -> dict:
    """One arm's row of the results, read from its metrics.jsonl, checkpoint and ablate-arm.json."""
    from t5forge.train.metrics_log import read_metrics

    path = arm_dir / METRICS
    if not path.is_file():
        raise T5ForgeError(f"{path} is missing: arm {name} has not trained; run the ablation again")
    records = read_metrics(path)
    train = [r for r in _latest_records(records, "train") if r.get("elapsed_train_seconds") is not None]
    evals = [r for r in _latest_records(records, "eval") if r.get("eval_loss") is not None]
    # Eval records carry the step, not the clock: their training time is read off the train records.
    steps = [r["step"] for r in train]
    seconds = [r["elapsed_train_seconds"] for r in train]

    def train_time(step):  # linear between logged steps; step 0 is at 0 s
        return _interp(step, [0, *steps], [0.0, *seconds]) if train else None

    curve = [[train_time(r["step"]), r["step"], r["eval_loss"]] for r in evals]
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s") is not None]
    marker = json.loads((arm_dir / ARM_FILE).read_text()) if (arm_dir / ARM_FILE).is_file() else {}
    parameters, active = _parameters(arm_dir)
    return {
        "arm": name,
        "overrides": list(overrides),
        "run_dir": str(arm_dir),
        "finished": bool(marker.get("finished")),
        "parameters": parameters,
        "active_parameters": active,  # a sparse arm's experts count top_k of num_experts
        "tokens_per_s": statistics.median(rates) if rates else None,
        "steps": steps[-1] if steps else 0,
        "train_seconds": seconds[-1] if seconds else 0.0,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        "best_eval_step": min(evals, key=lambda r: r["eval_loss"])["step"] if evals else None,
        **marker.get("memory", {}),
        "eval_curve": curve,  # [training seconds, step, eval_loss]
    }


def _interp(x, xs, ys):
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def write_results(out: Path, spec: Spec, rows: list[dict]) -> list[Path]:
    """OUT/results.json, OUT/results.md and OUT/curves.png."""
    header = {"spec": str(spec.path), "base": list(spec.base), "budget": spec.budget.text,
              "budget_means": spec.budget.describe(), "eval_loss": "held-out NLL, nats per target token",
              "active_parameters": "the parameters one token uses: a mixture of experts counts top_k of its "
                                   "experts (model/moe.py active_parameters); otherwise all of them",
              "arms": rows}
    (out / RESULTS_JSON).write_text(json.dumps(header, indent=2) + "\n")
    measures = next((r["rss_measures"] for r in rows if r.get("rss_measures")), None)
    lines = [
        f"# Ablation: {spec.path.name}", "",
        f"Budget per arm: {spec.budget.describe()}. Shared overrides: "
        f"{' '.join(f'`{b}`' for b in spec.base) or 'none'}.", "",
        "| arm | overrides | parameters | active parameters | tokens/s (median) | steps | training s "
        "| final held-out NLL | best held-out NLL (step) | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = "-" if r["best_eval_loss"] is None else f"{r['best_eval_loss']:.4f} ({r['best_eval_step']})"
        lines.append(
            f"| {r['arm']} | {' '.join(f'`{o}`' for o in r['overrides']) or '(base)'} | {_fmt(r['parameters'])} "
            f"| {_fmt(r['active_parameters'])} | {_fmt(r['tokens_per_s'])} | {r['steps']} | {r['train_seconds']:.1f} "
            f"| {_fmt(r['final_eval_loss'], '.4f')} | {best} | {_fmt(r.get('peak_rss_mib'), '.0f')} |")
    lines += ["", "NLL: held-out loss in nats per target token, on the same held-out batches for every arm. "
              "Active parameters equal parameters for now (no arm routes tokens to a subset of its weights). "
              f"Peak RSS: {measures or 'not measured'}.", "", f"![held-out NLL against training time]({CURVES})", ""]
    (out / RESULTS_MD).write_text("\n".join(lines))
    plot_curves(out / CURVES, rows, spec.budget.describe())
    return [out / RESULTS_JSON, out / RESULTS_MD, out / CURVES]


def plot_curves(path: Path, rows: list[dict], budget: str) -> None:
    """Held-out NLL against training seconds, one line per arm (matplotlib's object API, as plot.py)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"held-out NLL per arm ({budget} each)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out NLL (nats / target token)")
    ax.grid(True, alpha=0.3)
    for r in rows:
        points = [(t, loss) for t, _, loss in r["eval_curve"] if t is not None]
        if points:
            ax.plot([t for t, _ in points], [loss for _, loss in points], marker="o", label=r["arm"])
    if any(r["eval_curve"] for r in rows):
        ax.legend()
    fig.savefig(path)
