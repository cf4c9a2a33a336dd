"""metrics.jsonl writing and resume truncation, TensorBoard output, FLOPs / MFU estimates."""

import json
import math

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.train.metrics_log import (
    MetricsLogger,
    estimate_mfu,
    peak_flops,
    read_metrics,
    truncate_metrics,
)


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lines_are_flushed_and_json_clean(tmp_path):
    logger = MetricsLogger(tmp_path, progress=False)
    logger.log_train(1, loss=torch.tensor(2.5), lr=0.01, grad_norm=float("inf"), tokens_per_s=1000.0)
    # Readable while the logger is still open: a killed run leaves a current file.
    (rec,) = _lines(tmp_path)
    assert rec["step"] == 1 and rec["kind"] == "train" and rec["loss"] == 2.5 and rec["grad_norm"] is None
    logger.log_eval(1, eval_loss=float("nan"), eval_accuracy=0.25)
    logger.close()
    assert [r["kind"] for r in _lines(tmp_path)] == ["train", "eval"]
    assert _lines(tmp_path)[1]["eval_loss"] is None


def test_resume_keeps_history_up_to_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as logger:
        for step in range(1, 11):
            logger.log_train(step, loss=10.0 - step)
            if step % 5 == 0:
                logger.log_eval(step, eval_loss=9.0 - step)
    # A crash mid-write leaves a cut-off last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "kind": "tr')
    with MetricsLogger(tmp_path, resume_step=5, progress=False) as logger:
        logger.log_train(6, loss=0.5)
    steps = [(r["step"], r["kind"]) for r in _lines(tmp_path)]
    assert steps == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train"), (5, "eval"), (6, "train")]
    assert _lines(tmp_path)[-1]["loss"] == 0.5
    # A fresh run (no resume) starts a new history.
    with MetricsLogger(tmp_path, progress=False) as logger:
        logger.log_train(1, loss=1.0)
    assert len(_lines(tmp_path)) == 1


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\nGARBAGE\n{"step": 2, "kind": "train"}\n')
    with pytest.raises(T5ForgeError, match=r"metrics.jsonl:2 is not a JSON object"):
        truncate_metrics(path, 1)
    path.write_text('{"kind": "train"}\n')
    with pytest.raises(T5ForgeError, match='integer "step"'):
        read_metrics(path)


def test_tensorboard_events_are_written(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True, progress=False) as logger:
        logger.log_train(1, loss=3.0, lr=1e-3)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses():
        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    assert losses() == [(1, 3.0)]
    with MetricsLogger(tmp_path, tensorboard=True, resume_step=1, progress=False) as logger:
        logger.log_train(2, loss=2.0)
    assert losses() == [(1, 3.0), (2, 2.0)]
    # Resuming from step 1 again hides the step-2 event of the abandoned continuation.
    with MetricsLogger(tmp_path, tensorboard=True, resume_step=1, progress=False) as logger:
        logger.log_train(2, loss=1.5)
    assert losses() == [(1, 3.0), (2, 1.5)]


def test_console_line_without_a_terminal(tmp_path, capsys):
    with MetricsLogger(tmp_path, progress=True) as logger:  # pytest's stderr is not a TTY: plain lines
        logger.log_train(3, loss=2.5, lr=0.01, tokens_per_s=123456.0, grad_norm=None)
    assert capsys.readouterr().err.strip() == "step 3 train: loss=2.5000 lr=0.01 tok/s=123,456"


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path, enabled=False) as logger:
        logger.log_train(1, loss=1.0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mfu_and_peak_table(monkeypatch):
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12 and peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops("cpu", "fp32") is None and peak_flops(torch.device("cpu"), torch.bfloat16) is None
    # fp32 matmuls run as TF32 on tensor cores when the matmul precision allows it.
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
        torch.set_float32_matmul_precision("high")
        assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    finally:
        torch.set_float32_matmul_precision(previous)
    assert math.isclose(estimate_mfu(4.0e14, 1.0, 989e12), 4.0e14 / 989e12)
    assert estimate_mfu(1e12, 1.0, None) is None and estimate_mfu(1e12, 0.0, 1e12) is None
