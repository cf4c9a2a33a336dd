"""The feed-forward twin (fast/feed_forward.py) against the plain FeedForward, forward and backward,
fp32 and under bf16 autocast; `fused_linear`, the stacked matmul it and the attention twin use."""

import pytest
import torch
from fast_cases import TOL, grads_of, tiny_config

from t5forge.model.fast.feed_forward import FastFeedForward, fused_linear
from t5forge.model.t5 import FeedForward


def feed_forwards(feed_forward_proj):
    torch.manual_seed(0)
    plain = FeedForward(tiny_config(feed_forward_proj=feed_forward_proj))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    twin = FeedForward(tiny_config(feed_forward_proj=feed_forward_proj))
    twin.load_state_dict(plain.state_dict())
    twin.__class__ = FastFeedForward
    return plain, twin


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "gated-silu", "relu"])
def test_feed_forward_twin_equals_the_plain_module(feed_forward_proj):
    plain, twin = feed_forwards(feed_forward_proj)
    x = torch.randn(3, 7, 32, requires_grad=True)
    out, ref = twin(x), plain(x)
    torch.testing.assert_close(out, ref, **TOL)
    for g, w in zip(grads_of(out, (x, *twin.parameters())), grads_of(ref, (x, *plain.parameters()))):
        torch.testing.assert_close(g, w, **TOL)


def test_feed_forward_twin_under_bf16_autocast_is_as_close_to_fp32_as_the_plain_module():
    plain, twin = feed_forwards("gated-gelu")
    x = torch.randn(3, 7, 32, requires_grad=True)
    ref = plain(x)  # fp32
    want = grads_of(ref, (x, *plain.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, half = twin(x), plain(x)
    assert out.dtype == half.dtype == torch.bfloat16
    for got, other, w in zip(grads_of(out, (x, *twin.parameters())), grads_of(half, (x, *plain.parameters())), want):
        assert got.dtype == torch.float32
        assert (got - w).norm() <= 1.5 * (other - w).norm() + 1e-3 * w.norm()


def test_fused_projections_match_separate_layers():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, n, bias=False) for n in (8, 8, 12)]
    x = torch.randn(2, 5, 16, requires_grad=True)
    plain = fused_linear(x, *layers)  # no autocast: the layers themselves
    for out, layer in zip(plain, layers):
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    g = [torch.randn(2, 5, n) for n in (8, 8, 12)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear(x, *layers)  # one matmul, one cast of x
        separate = [layer(x) for layer in layers]
    grads = [torch.autograd.grad(outs, [x, *(layer.weight for layer in layers)], g) for outs in (fused, separate)]
    for a, b in zip(fused, separate):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
