"""PNG training curves from a run's metrics.jsonl: loss (train raw + smoothed, eval), learning rate,
throughput (tokens/s and MFU), gradient norm, and other evaluation metrics.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display needed), so it runs on
headless machines and inside the training process alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t5forge.errors import T5ForgeError
from t5forge.train.metrics_log import METRICS_FILE, read_metrics

_SKIP = {"step", "kind", "time"}


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


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path)
    written.append(path)


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
    name = run_dir.resolve().name
    out = Path(output_dir) if output_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    written: list[Path] = []

    if _has(train, "loss") or _has(evals, "eval_loss"):
        fig, ax = _figure(f"{name}: loss")
        if _has(train, "loss"):
            steps, loss = _series(train, "loss")
            ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
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
        _save(fig, out / "loss.png", written)

    if _has(train, "lr"):
        fig, ax = _figure(f"{name}: learning rate")
        ax.plot(*_series(train, "lr"), color="tab:green")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _save(fig, out / "lr.png", written)

    if _has(train, "tokens_per_s"):
        fig, ax = _figure(f"{name}: throughput")
        steps, tps = _series(train, "tokens_per_s")
        ax.plot(steps, tps, color="tab:purple")
        ax.set_ylabel("tokens / s")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(_thousands)
        if _has(train, "mfu"):
            # MFU is tokens/s times a constant (FLOPs per token / peak): a second scale, not a second line.
            _, mfu = _series(train, "mfu")
            ratio = np.nanmedian(mfu / np.where(tps > 0, tps, np.nan))
            if np.isfinite(ratio) and ratio > 0:
                right = ax.secondary_yaxis("right", functions=(lambda t: 100 * ratio * t, lambda m: m / (100 * ratio)))
                right.set_ylabel("MFU (%)")
        _save(fig, out / "throughput.png", written)

    if _has(train, "grad_norm"):
        fig, ax = _figure(f"{name}: gradient norm (before clipping)")
        steps, norm = _series(train, "grad_norm")
        ax.plot(steps, norm, color="tab:red", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(norm), color="tab:red", linewidth=1.5)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_ylabel("global L2 norm")
        _save(fig, out / "grad_norm.png", written)

    others = sorted({k for r in evals for k in r if k not in _SKIP | {"eval_loss"} and _has(evals, k)})
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
        _save(fig, out / "eval_metrics.png", written)

    if not written:
        raise T5ForgeError(f"{metrics} has no loss, lr or throughput values to plot")
    return written
