"""The results of `t5forge ablate`: each run's summary (read from its metrics.jsonl, checkpoint and
ablate-arm.json), each arm's across its seeds, and OUT/results.json, results.md and curves.png.

With seeds, an arm's NLLs are the mean over its seeds, with every seed's value beside it, and the
first arm's (the reference's) seed spread, max - min of its final NLL, is the noise figure: a
difference between arms smaller than it is not resolved by the runs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from t5forge.ablation import ARM_FILE, Run, Spec
from t5forge.errors import T5ForgeError
from t5forge.run_layout import METRICS, MODEL_CONFIG, MODEL_WEIGHTS, newest_model_checkpoint

RESULTS_JSON, RESULTS_MD, CURVES = "results.json", "results.md", "curves.png"
NLL = ("final_eval_loss", "best_eval_loss")


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


def summarize(run: Run, overrides: tuple[str, ...]) -> dict:
    """One run's row of the results, read from its metrics.jsonl, checkpoint and ablate-arm.json."""
    from t5forge.train.metrics_log import read_metrics

    arm_dir = run.dir
    path = arm_dir / METRICS
    if not path.is_file():
        raise T5ForgeError(f"{path} is missing: arm {run.label} has not trained; run the ablation again")
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
    seed = {} if run.seed is None else {"seed": run.seed}
    return {
        "arm": run.arm,
        **seed,
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


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _spread(values):
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) > 1 else None


def aggregate(arm: str, overrides: tuple[str, ...], runs: list[dict]) -> dict:
    """One arm's row across its seeds: means, every seed's NLLs and their spread; the runs' rows kept."""
    row = {
        "arm": arm,
        "overrides": list(overrides),
        "seeds": [r["seed"] for r in runs],
        "finished": all(r["finished"] for r in runs),
        "parameters": runs[0]["parameters"],
        "active_parameters": runs[0]["active_parameters"],
        "tokens_per_s": _mean(r["tokens_per_s"] for r in runs),
        "steps": _mean(r["steps"] for r in runs),
        "train_seconds": _mean(r["train_seconds"] for r in runs),
    }
    for key in NLL:
        values = [r[key] for r in runs]
        row.update({key: _mean(values), f"{key}_per_seed": values, f"{key}_spread": _spread(values)})
    rss = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
    row["peak_rss_mib"] = max(rss) if rss else None
    row["rss_measures"] = next((r["rss_measures"] for r in runs if r.get("rss_measures")), None)
    row["runs"] = runs
    return row


def seed_noise(rows: list[dict]) -> dict:
    """The reference (first) arm's seed spread: the yardstick for every other arm's difference from it."""
    ref = rows[0]
    finals = [v for v in ref["final_eval_loss_per_seed"] if v is not None]
    return {"arm": ref["arm"], "seeds": ref["seeds"], "final_eval_loss_spread": ref["final_eval_loss_spread"],
            "best_eval_loss_spread": ref["best_eval_loss_spread"],
            "final_eval_loss_stdev": statistics.stdev(finals) if len(finals) > 1 else None,
            "means": "max - min over the seeds of the first arm's held-out NLL; stdev: the sample standard deviation"}


def results(spec: Spec, out: Path) -> list[dict]:
    """The rows of the results: one per arm (without seeds, the run's; with seeds, `aggregate`'s)."""
    runs = spec.runs(out)
    if spec.seeds is None:
        return [summarize(run, spec.arms[run.arm]) for run in runs]
    return [aggregate(arm, spec.arms[arm], [summarize(run, spec.arms[arm]) for run in runs if run.arm == arm])
            for arm in spec.arms]


def _seeded(values, spec: str = ".4f") -> str:
    return " / ".join(_fmt(v, spec) for v in values)


def _table(spec: Spec, rows: list[dict]) -> list[str]:
    seeded = spec.seeds is not None
    if not seeded:
        lines = ["| arm | overrides | parameters | active parameters | tokens/s (median) | steps | training s "
                 "| final held-out NLL | best held-out NLL (step) | peak RSS MiB |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines = [f"| arm | overrides | parameters | active parameters | tokens/s (median) | steps | training s "
                 f"| final held-out NLL: mean | per seed ({' / '.join(map(str, spec.seeds))}) | vs {rows[0]['arm']} (per seed) "
                 f"| best held-out NLL: mean | per seed | peak RSS MiB |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reference = rows[0]["final_eval_loss"]
    for r in rows:
        common = (f"| {r['arm']} | {' '.join(f'`{o}`' for o in r['overrides']) or '(base)'} "
                  f"| {_fmt(r['parameters'])} | {_fmt(r['active_parameters'])} | {_fmt(r['tokens_per_s'])} "
                  f"| {_fmt(r['steps'])} | {r['train_seconds']:.1f} ")
        if not seeded:
            best = "-" if r["best_eval_loss"] is None else f"{r['best_eval_loss']:.4f} ({r['best_eval_step']})"
            lines.append(f"{common}| {_fmt(r['final_eval_loss'], '.4f')} | {best} | {_fmt(r.get('peak_rss_mib'), '.0f')} |")
            continue
        delta = None if r["final_eval_loss"] is None or reference is None else r["final_eval_loss"] - reference
        # Per seed, paired: at one seed both arms saw the same data order and held-out masks.
        paired = [None if a is None or b is None else a - b
                  for a, b in zip(r["final_eval_loss_per_seed"], rows[0]["final_eval_loss_per_seed"])]
        lines.append(f"{common}| {_fmt(r['final_eval_loss'], '.4f')} | {_seeded(r['final_eval_loss_per_seed'])} "
                     f"| {_fmt(delta, '+.4f')} ({_seeded(paired, '+.4f')}) | {_fmt(r['best_eval_loss'], '.4f')} "
                     f"| {_seeded(r['best_eval_loss_per_seed'])} | {_fmt(r.get('peak_rss_mib'), '.0f')} |")
    return lines


def write_results(out: Path, spec: Spec, rows: list[dict]) -> list[Path]:
    """OUT/results.json, OUT/results.md and OUT/curves.png."""
    header = {"spec": str(spec.path), "base": list(spec.base), "budget": spec.budget.text,
              "budget_means": spec.budget.describe(), "eval_loss": "held-out NLL, nats per target token",
              "active_parameters": "the parameters one token uses: a mixture of experts counts top_k of its "
                                   "experts (model/moe.py active_parameters); otherwise all of them"}
    if spec.seeds is not None:
        header.update(seeds=list(spec.seeds), seed_noise=seed_noise(rows),
                      per_arm="mean over the seeds (steps, training s, tokens/s and NLLs); *_per_seed in the "
                              "order of seeds; runs: each seed's own row")
    header["arms"] = rows
    (out / RESULTS_JSON).write_text(json.dumps(header, indent=2) + "\n")
    measures = next((r["rss_measures"] for r in rows if r.get("rss_measures")), None)
    lines = [f"# Ablation: {spec.path.name}", "",
             f"Budget per arm: {spec.budget.describe()}"
             + ("" if spec.seeds is None else f", once per seed ({', '.join(map(str, spec.seeds))})")
             + f". Shared overrides: {' '.join(f'`{b}`' for b in spec.base) or 'none'}.", "",
             *_table(spec, rows), ""]
    if spec.seeds is not None:
        noise = header["seed_noise"]
        lines += [f"Seed noise: {noise['arm']}'s final held-out NLL spans {_fmt(noise['final_eval_loss_spread'], '.4f')} "
                  f"over its {len(spec.seeds)} seeds (max - min; best NLL: {_fmt(noise['best_eval_loss_spread'], '.4f')}). "
                  f"A difference from {noise['arm']} smaller than that is not resolved by these runs. Steps, training s "
                  f"and tokens/s are means over the seeds.", ""]
    same = "for every arm" if spec.seeds is None else "for every arm at one seed (the seed draws their noise masks)"
    lines += [f"NLL: held-out loss in nats per target token, on the same held-out batches {same}. "
              "Active parameters: those one token uses (a mixture of experts counts top_k of its experts). "
              f"Peak RSS: {measures or 'not measured'}.", "", f"![held-out NLL against training time]({CURVES})", ""]
    (out / RESULTS_MD).write_text("\n".join(lines))
    plot_curves(out / CURVES, rows, spec.budget.describe())
    return [out / RESULTS_JSON, out / RESULTS_MD, out / CURVES]


def plot_curves(path: Path, rows: list[dict], budget: str) -> None:
    """Held-out NLL against training seconds, one colour per arm (each seed its own line, the arm named
    once); with seeds, beside it each arm's final NLL per seed and their mean (matplotlib's object API,
    as plot.py)."""
    from matplotlib.figure import Figure

    seeded = any("runs" in r for r in rows)
    fig = Figure(figsize=(12, 5) if seeded else (8, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot(1, 2, 1) if seeded else fig.add_subplot()
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out NLL (nats / target token)")
    ax.grid(True, alpha=0.3)
    plotted = []
    for index, r in enumerate(rows):
        for n, run in enumerate(r.get("runs", [r])):
            points = [(t, loss) for t, _, loss in run["eval_curve"] if t is not None]
            if points:
                ax.plot([t for t, _ in points], [loss for _, loss in points], marker="o", markersize=3,
                        color=f"C{index % 10}", linewidth=1.2, label=r["arm"] if n == 0 else None)
                plotted.append([loss for _, loss in points])
    title = f"held-out NLL per arm ({budget} each)"
    if plotted:
        # A fresh model's first evaluation sits far above the rest: the axis starts at the second.
        late = [losses[1:] or losses for losses in plotted]
        low, high = min(min(v) for v in late), max(max(v) for v in late)
        if high > low and any(len(v) > 1 for v in plotted):
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
            title += "; first evaluation off the axis"
        ax.legend()
    ax.set_title(title)
    if seeded:
        final = fig.add_subplot(1, 2, 2)
        final.set_title("final held-out NLL: each seed (dots) and the mean (bar)")
        final.grid(True, axis="x", alpha=0.3)
        for index, r in enumerate(rows):
            y = len(rows) - 1 - index
            values = [v for v in r["final_eval_loss_per_seed"] if v is not None]
            final.scatter(values, [y] * len(values), color=f"C{index % 10}", s=25, zorder=3)
            if r["final_eval_loss"] is not None:
                final.plot([r["final_eval_loss"]] * 2, [y - 0.3, y + 0.3], color=f"C{index % 10}", linewidth=2)
        final.set_yticks(range(len(rows)), [r["arm"] for r in reversed(rows)])
        final.set_xlabel("held-out NLL (nats / target token)")
    fig.savefig(path)
