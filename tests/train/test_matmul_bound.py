"""benchmarks/matmul_bound.py: the matmul-like calls of a training step, recorded and replayed alone."""

import sys
from pathlib import Path

import torch

from t5forge.model.config import T5Config
from t5forge.model.loss import seq2seq_loss
from t5forge.model.t5 import T5

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from matmul_bound import TensorSpec, record_matmuls, replay_times


def tiny_step():
    config = T5Config(vocab_size=64, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_layers=2, dropout_rate=0.0,
                      attention_backend="sdpa")
    model = T5(config)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, 64, (2, 12), generator=g), torch.randint(2, 64, (2, 5), generator=g)
    return lambda: seq2seq_loss(model, input_ids=ids, labels=labels).backward()


def test_records_forward_and_backward_matmuls_with_their_layouts():
    calls = record_matmuls(tiny_step())
    names = [c.op.overloadpacket.__name__ for c in calls]
    # q/k/v/o, feed-forward and lm_head matmuls, forward and backward; attention's own batched matmuls
    assert names.count("mm") + names.count("addmm") > 30
    assert "bmm" in names or "baddbmm" in names
    shapes = {c.args[0].shape for c in calls if isinstance(c.args[0], TensorSpec) and c.args[0].shape[-1] == 16}
    assert (24, 16) in shapes  # encoder tokens x d_model into q/k/v: 2 rows x 12 tokens
    # transposed operands keep their strides (a weight read as W^T is not a contiguous matrix)
    assert any(c.args[1].stride[0] == 1 and c.args[1].stride[1] > 1
               for c in calls if len(c.args) > 1 and isinstance(c.args[1], TensorSpec) and len(c.args[1].shape) == 2)


def test_replay_times_every_call_and_identical_calls_once():
    calls = record_matmuls(tiny_step())
    times = replay_times(calls, torch.device("cpu"), repeats=1)
    assert len(times) == len(calls) and all(t > 0 for t in times)
    repeated = replay_times(calls[:1] * 4, torch.device("cpu"), repeats=1)
    assert len(repeated) == 4 and len(set(repeated)) == 1  # timed once, counted four times
