"""The TokenNLL twin (fast/loss.py): the chunked lm_head + cross-entropy against the plain formula
(loss and both gradients, several chunkings, extreme logits, frozen weights, bf16), its CPU buffer,
its one-time hand-over of gradients; the twin module against the plain TokenNLL."""

import pytest
import torch
import torch.nn.functional as F
from fast_cases import TOL

from t5forge.model.fast.loss import FastTokenNLL, linear_cross_entropy
from t5forge.model.loss import TokenNLL


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


def test_chunked_cross_entropy_under_bf16_autocast_is_close_and_fp32():
    x, w, labels = ce_inputs(C=32)
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, labels, compute_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()


def test_token_nll_twin_equals_the_plain_loss_and_takes_the_plain_path_without_grad():
    x, w, labels = ce_inputs()
    x3, labels3 = x.view(1, *x.shape), labels.view(1, -1)  # (B, T, C) as the model gives it
    plain, twin = TokenNLL(), TokenNLL()
    twin.__class__ = FastTokenNLL
    ref = plain(x3, w, labels3)
    out = twin(x3, w, labels3)
    assert type(out.grad_fn).__name__ == "_LinearCrossEntropyBackward"  # chunked while training
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(torch.autograd.grad(out * 2.0, (x, w)), torch.autograd.grad(ref * 2.0, (x, w))):
        torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():  # evaluation: the plain formula
        torch.testing.assert_close(twin(x3, w, labels3), plain(x3, w, labels3), rtol=0, atol=0)
    assert out.dtype == torch.float32
