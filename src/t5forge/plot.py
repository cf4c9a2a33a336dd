"""PNG training curves from a run's metrics.jsonl: loss (train raw + smoothed, eval), learning rate,
throughput (tokens/s and MFU, against the step and against elapsed wall-clock time), gradient norm,
and the other evaluation metrics.

`figures(records, name)` builds the matplotlib Figures (one per PNG, keyed by file stem);
`plot_run(run_dir)` reads metrics.jsonl and writes them. Uses matplotlib's object API with the Agg
canvas (no pyplot, no display needed), so it runs on headless machines and inside the training
process alike.

What counts as a metric (`is_metric`): a numeric field that is not a flag and not bookkeeping. The
bookkeeping fields are named in BOOKKEEPING (step, kind, time, best) or by their suffix: counts and
durations of the evaluation itself (eval_tokens, gen_examples, eval_seconds, ..., see
BOOKKEEPING_SUFFIXES), which say how an evaluation was made, not how good the model is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t5forge.errors import T5ForgeError
from t5forge.run_layout import METRICS as METRICS_FILE
from t5forge.run_layout import PLOTS
from t5forge.train.metrics_log import read_metrics

BOOKKEEPING = frozenset({"step", "kind", "time", "best"})
BOOKKEEPING_SUFFIXES = ("_tokens", "_examples", "_batches", "_steps", "_seconds")


def is_metric(key: str, records: list[dict]) -> bool:
    """Whether `key` of these records is a metric to plot (see the module docstring)."""
    if key in BOOKKEEPING or key.endswith(BOOKKEEPING_SUFFIXES):
        return False
    values = [r[key] for r in records if r.get(key) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Centred moving average (no lag, unlike an EMA); NaNs (non-finite losses) are left out of it.

    The default half-window is about 1/40 of the curve; near the ends it shrinks symmetrically.
    """
    n = len(values)
    if window is None:
        window = max(1, n // 40)
    finite = ~np.isnan(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(n)
    half = np.minimum(np.minimum(idx, n - 1 - idx), window)
    lo, hi = idx - half, idx + half + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[hi] > counts[lo], (sums[hi] - sums[lo]) / (counts[hi] - counts[lo]), np.nan)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r]
    steps = np.array([s for s, _ in rows], dtype=float)
    values = np.array([np.nan if v is None else float(v) for _, v in rows], dtype=float)
    return steps, values


def _has(records: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) for r in records)


def _figure(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(NullLocator())


def _thousands(value, _pos) -> str:
    return f"{value / 1000:g}k" if abs(value) >= 1000 else f"{value:g}"


def elapsed_hours_or_minutes(train: list[dict]) -> tuple[np.ndarray, str]:
    """(elapsed wall-clock time of each train record, axis label): the records' `elapsed_seconds`
    (since the run began, resumes included), or for older runs their `time` since the first record."""
    if all(isinstance(r.get("elapsed_seconds"), (int, float)) for r in train):
        seconds = np.array([r["elapsed_seconds"] for r in train], dtype=float)
    else:
        seconds = np.array([r["time"] for r in train], dtype=float) - float(train[0]["time"])
    last = float(np.nanmax(seconds)) if len(seconds) else 0.0
    if last >= 2 * 3600:
        return seconds / 3600, "elapsed time (h)"
    if last >= 120:
        return seconds / 60, "elapsed time (min)"
    return seconds, "elapsed time (s)"


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write PNG curves of `run_dir`'s metrics.jsonl into `output_dir` (default RUN_DIR/plots)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise T5ForgeError(
            f"{metrics} not found; give the run directory of a t5forge pretrain/finetune run (its out_dir)"
        )
    records = read_metrics(metrics)
    if not records:
        raise T5ForgeError(f"{metrics} has no records yet; plot again after the run has logged a step")
    built = figures(records, run_dir.resolve().name)
    if not built:
        raise T5ForgeError(f"{metrics} has no loss, lr or throughput values to plot")
    out = Path(output_dir) if output_dir is not None else run_dir / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in built.items():
        fig.savefig(out / f"{stem}.png")
        written.append(out / f"{stem}.png")
    return written


def figures(records: list[dict], name: str) -> dict:
    """{file stem: matplotlib Figure} for the records of a metrics.jsonl (train and eval kinds)."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    built: dict = {}

    if _has(train, "loss") or _has(evals, "eval_loss"):
        fig, ax = _figure(f"{name}: loss")
        if _has(train, "loss"):
            steps, loss = _series(train, "loss")
            ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)",
                    marker="." if len(steps) < 50 else None)
            ax.plot(steps, smooth(loss), color="tab:blue", linewidth=1.8, label="train (smoothed)")
        if _has(evals, "eval_loss"):
            steps, loss = _series(evals, "eval_loss")
            ax.plot(steps, loss, color="tab:orange", marker="o", markersize=4, linewidth=1.5, label="eval")
            best = int(np.nanargmin(loss))
            ax.annotate(f"best {loss[best]:.3f}", (steps[best], loss[best]), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=8, color="tab:orange")
        ax.set_ylabel("cross-entropy per target token")
        # Log scale: the first steps (~ln(vocab) = 10) would otherwise flatten the part that matters.
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.legend()
        built["loss"] = fig

    if _has(train, "lr"):
        fig, ax = _figure(f"{name}: learning rate")
        steps, lr = _series(train, "lr")
        ax.plot(steps, lr, color="tab:green", marker="." if len(steps) < 50 else None)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        built["lr"] = fig

    if _has(train, "tokens_per_s"):
        from matplotlib.figure import Figure

        # Against the step, and against the wall clock: where the time went (evaluations,
        # checkpoints and restarts show as gaps between the points).
        fig = Figure(figsize=(8, 7), dpi=120, layout="constrained")
        by_step, by_time = fig.subplots(2, 1)
        fig.suptitle(f"{name}: throughput")
        rows = [r for r in train if "tokens_per_s" in r]
        steps, tps = _series(rows, "tokens_per_s")
        elapsed, time_label = elapsed_hours_or_minutes(rows)
        ratio = None
        if _has(train, "mfu"):
            # MFU is tokens/s times a constant (FLOPs per token / peak): a second scale, not a second line.
            _, mfu = _series(rows, "mfu")
            ratio = np.nanmedian(mfu / np.where(tps > 0, tps, np.nan))
        for ax, x, label in ((by_step, steps, "step"), (by_time, elapsed, time_label)):
            ax.plot(x, tps, color="tab:purple", marker="." if len(x) < 50 else None)
            ax.set_xlabel(label)
            ax.set_ylabel("tokens / s")
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(_thousands)
            ax.grid(True, alpha=0.3)
            if ratio is not None and np.isfinite(ratio) and ratio > 0:
                right = ax.secondary_yaxis("right", functions=(lambda t: 100 * ratio * t, lambda m: m / (100 * ratio)))
                right.set_ylabel("MFU (%)")
        built["throughput"] = fig

    if _has(train, "grad_norm"):
        fig, ax = _figure(f"{name}: gradient norm (before clipping)")
        steps, norm = _series(train, "grad_norm")
        ax.plot(steps, norm, color="tab:red", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(norm), color="tab:red", linewidth=1.5)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_ylabel("global L2 norm")
        built["grad_norm"] = fig

    others = sorted({k for r in evals for k in r if k != "eval_loss" and is_metric(k, evals)})
    if others:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 2.6 * len(others)), dpi=120, layout="constrained")
        axes = fig.subplots(len(others), 1, sharex=True, squeeze=False)[:, 0]
        fig.suptitle(f"{name}: evaluation")
        for ax, key in zip(axes, others):
            ax.plot(*_series(evals, key), marker="o", markersize=4, color="tab:orange")
            ax.set_ylabel(key)
            ax.grid(True, alpha=0.3)
        axes[-1].set_xlabel("step")
        built["eval_metrics"] = fig
    return built
