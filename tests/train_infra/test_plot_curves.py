"""`t5forge plot`: PNG curves from metrics.jsonl, and clear errors for runs without metrics."""

import math

import numpy as np
import pytest
from matplotlib.image import imread

from t5forge.cli import main
from t5forge.errors import T5ForgeError
from t5forge.plot import plot_run, smooth
from t5forge.train.metrics_log import MetricsLogger


def _write_run(run_dir, steps=300):
    rng = np.random.default_rng(0)
    with MetricsLogger(run_dir, progress=False) as logger:
        for step in range(1, steps + 1):
            lr = 0.01 * min(1.0, step / 30) * (0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = 2.5 + 7.5 * math.exp(-step / 40) + rng.normal(0, 0.1)
            tps = 2000.0 if step == 1 else 50_000 + rng.normal(0, 800)  # compile warm-up on step 1
            logger.log_train(step, loss=loss, lr=lr, grad_norm=1 + math.exp(-step / 50), tokens_per_s=tps,
                             mfu=tps * 4e-6, seconds_per_step=0.1)
            if step % 50 == 0:
                logger.log_eval(step, eval_loss=2.4 + 7.5 * math.exp(-step / 40), eval_accuracy=step / 1000)
        logger.log_train(steps + 1, loss=float("nan"), lr=0.0)  # a diverged step is a gap, not a crash


def test_plot_writes_readable_pngs(tmp_path):
    run = tmp_path / "my-run"
    _write_run(run)
    written = plot_run(run)
    assert [p.name for p in written] == ["loss.png", "lr.png", "throughput.png", "grad_norm.png", "eval_metrics.png"]
    for path in written:
        assert path.parent == run / "plots"
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_cli_with_output_dir(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, steps=20)
    assert main(["plot", str(run), "--output", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "figs" / "loss.png") in printed
    assert (tmp_path / "figs" / "loss.png").stat().st_size > 10_000


def test_plot_errors_clearly(tmp_path, capsys):
    with pytest.raises(T5ForgeError, match="metrics.jsonl not found"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(T5ForgeError, match="has no records yet"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5forge plot: error:") and "no records" in err and "\n" not in err


def test_smooth_is_centred_and_skips_nan():
    values = np.array([0.0, 1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    out = smooth(values, window=1)
    assert out[0] == 0.0 and out[1] == 1.0 and out[2] == 1.5 and out[3] == 3.0 and out[6] == 6.0
