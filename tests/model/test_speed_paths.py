"""The fast paths of a training step against their plain formulas: the chunked lm_head +
cross-entropy, the written-out RMSNorm backward and lazy logits (AdamWScale's implementations: tests/optim)."""

import pytest
import torch
import torch.nn.functional as F

from t5forge.model.config import T5Config
from t5forge.model.cross_entropy import linear_cross_entropy
from t5forge.model.t5 import T5, RMSNorm, fused_linear

TOL = {"rtol": 1e-5, "atol": 1e-5}


def ce_inputs(N=37, C=8, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    labels[-8:] = -100  # a chunk with ignored rows only
    return x, w, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_rows", [4, 8, 64])  # divides N or not; one chunk for all
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(reduction, chunk_rows):
    x, w, labels = ce_inputs()
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100, reduction=reduction)
    ref_dx, ref_dw = torch.autograd.grad(ref * 3.0, (x, w))  # a non-unit upstream gradient
    loss = linear_cross_entropy(x, w, labels, reduction, chunk_rows=chunk_rows)
    dx, dw = torch.autograd.grad(loss * 3.0, (x, w))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    torch.testing.assert_close(dw, ref_dw, **TOL)
    assert dx[labels == -100].abs().sum() == 0


def test_chunked_cross_entropy_survives_extreme_logits_and_frozen_weights():
    x, w, labels = ce_inputs()
    x = (x * 200).detach().requires_grad_()  # logits of +-1e3: the clamp before exp must not matter
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100, reduction="sum")
    loss = linear_cross_entropy(x, w.detach(), labels, "sum", chunk_rows=8)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)
    (dx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(dx, torch.autograd.grad(ref, x)[0], **TOL)


def test_chunked_cross_entropy_hands_its_gradients_over_once():
    # Gradients are scaled in place and handed to autograd: two forward passes accumulate
    # correctly into .grad, and a second backward through one pass is a clear error, not a
    # silently doubled scale.
    x, w, labels = ce_inputs()
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100, reduction="sum")
    ref_dw = torch.autograd.grad(ref * 5.0, w)[0]  # 2.0 + 3.0 below
    (linear_cross_entropy(x, w, labels, "sum", chunk_rows=8) * 2.0).backward()
    (linear_cross_entropy(x, w, labels, "sum", chunk_rows=8) * 3.0).backward()
    torch.testing.assert_close(w.grad, ref_dw, **TOL)
    loss = linear_cross_entropy(x, w, labels, "sum", chunk_rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunked_cross_entropy_reuses_its_cpu_buffer_across_shapes_and_dtypes():
    # The logits buffer outlives a call (CPU): calls of other sizes and dtypes in between must not
    # change a result.
    for n, v, dtype in [(37, 50, None), (64, 300, None), (9, 50, torch.bfloat16), (37, 50, None), (64, 300, None)]:
        x, w, labels = ce_inputs(N=n, V=v, seed=n + v)
        ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100, reduction="sum")
        loss = linear_cross_entropy(x, w, labels, "sum", chunk_rows=16, compute_dtype=dtype)
        tol = {"rtol": 2e-2, "atol": 1e-1} if dtype else TOL
        torch.testing.assert_close(loss, ref, **tol)


def test_one_embedding_lookup_for_both_stacks_matches_two():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0))
    ids, dec = torch.randint(0, 300, (3, 11)), torch.randint(0, 300, (3, 5))
    src, tgt = model._embed_pair(ids, dec)
    (src.square().sum() + tgt.sum()).backward()
    one = model.shared.weight.grad.clone()
    model.shared.weight.grad = None
    (model.shared(ids).square().sum() + model.shared(dec).sum()).backward()
    torch.testing.assert_close(src, model.shared(ids))
    torch.testing.assert_close(tgt, model.shared(dec))
    torch.testing.assert_close(one, model.shared.weight.grad)


def test_chunked_cross_entropy_under_bf16_autocast_is_close_and_fp32():
    x, w, labels = ce_inputs(C=32)
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, labels, compute_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()


def test_training_forward_uses_the_chunked_loss_and_computes_logits_on_demand():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0)).train()
    ids, labels = torch.randint(2, 300, (3, 11)), torch.randint(2, 300, (3, 5))
    labels[0, 3:] = -100
    out = model(ids, labels=labels, loss_reduction="sum")
    assert out.loss.grad_fn is not None and out._logits is None  # no logits were made
    with torch.no_grad():
        plain = model(ids, labels=labels, loss_reduction="sum")  # the plain path
    torch.testing.assert_close(out.loss, plain.loss, **TOL)
    torch.testing.assert_close(out.logits, plain.logits, **TOL)  # computed now, on first read
    assert out.logits is out.logits


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


def test_bf16_autocast_training_gradients_close_to_fp32():
    # The bf16 training path (fused projections, chunked CE in bf16, RMSNorm) against fp32.
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=300, dropout_rate=0.0)).train()
    ids, labels = torch.randint(2, 300, (3, 11)), torch.randint(2, 300, (3, 5))
    model(ids, labels=labels, loss_reduction="sum").loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=labels, loss_reduction="sum").loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        # bf16 rounding alone moves the worst element by ~5% of the largest (seeds 0-3: 3.8-5.3%,
        # with or without the fused projections); a wrong gradient would be off by ~100%.
        scale = ref[name].abs().max()
        assert (p.grad - ref[name]).abs().max() <= 0.1 * scale, name
        assert (p.grad - ref[name]).norm() <= 0.05 * ref[name].norm(), name


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_function_equals_the_formula(weight_dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def formula(x, weight):  # HF's T5LayerNorm
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return weight * (y.to(weight.dtype) if weight.dtype != torch.float32 else y)

    dy = torch.randn(2, 5, 16)
    out = norm(x)
    assert out.dtype == formula(x, norm.weight).dtype == weight_dtype  # bf16 weights: bf16 output, as HF
    # The reference in fp32 arithmetic (a bf16 reference would only add its own rounding).
    weight = norm.weight.detach().float().requires_grad_()
    ref = formula(x, weight)
    tol = TOL if weight_dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out.float(), ref, **tol)
    got = torch.autograd.grad(out, (x, norm.weight), dy.to(out.dtype))
    want = torch.autograd.grad(ref, (x, weight), dy)
    assert got[0].dtype == torch.float32 and got[1].dtype == weight_dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, **tol)
