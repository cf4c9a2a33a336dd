"""Adafactor against its definition (numpy, float64) and against transformers' Adafactor."""

import numpy as np
import pytest
import torch

from t5forge.optim.adafactor import Adafactor


def rms(x):
    return np.sqrt(np.mean(x * x))


def reference_adafactor(p0, grads, lr, wd=0.0, beta1=None, eps1=1e-30, eps2=1e-3, clip=1.0, decay=-0.8):
    """Shazeer & Stern (2018) Alg. 4/5 with T5's settings, factored over the last two dims when ndim >= 2."""
    p = p0.copy()
    factored = p.ndim >= 2
    R = np.zeros(p.shape[:-1]) if factored else None
    C = np.zeros(p.shape[:-2] + p.shape[-1:]) if factored else None
    V = None if factored else np.zeros_like(p)
    M = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        beta2t = 1 - t**decay
        G = g * g + eps1
        if factored:
            R = beta2t * R + (1 - beta2t) * G.mean(axis=-1)
            C = beta2t * C + (1 - beta2t) * G.mean(axis=-2)
            Vhat = (R / R.mean(axis=-1, keepdims=True))[..., :, None] * C[..., None, :]
        else:
            V = beta2t * V + (1 - beta2t) * G
            Vhat = V
        U = g / np.sqrt(Vhat)
        U = U / max(1.0, rms(U) / clip)
        if beta1 is not None:
            M = beta1 * M + (1 - beta1) * U
            U = M
        alpha = lr * max(eps2, rms(p))
        p = p - alpha * wd * p - alpha * U
    return p


CASES = {"factored": (4, 3), "unfactored": (5,), "factored_3d": (2, 3, 4)}


@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("wd, beta1", [(0.0, None), (0.1, None), (0.0, 0.9)])
def test_matches_definition(shape, wd, beta1):
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=shape)
    # Growing gradients make the clipping (RMS(U) > 1) fire after the first step.
    grads = [rng.normal(size=shape) * (1 + 3 * i) for i in range(6)]
    p = torch.nn.Parameter(torch.tensor(p0))
    opt = Adafactor([p], lr=1e-2, weight_decay=wd, beta1=beta1)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    expected = reference_adafactor(p0, grads, lr=1e-2, wd=wd, beta1=beta1)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-9, atol=1e-12)


def test_factored_state_is_small():
    p = torch.nn.Parameter(torch.randn(6, 5))
    p.grad = torch.randn(6, 5)
    opt = Adafactor([p])
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_row"].shape == (6,) and state["exp_avg_sq_col"].shape == (5,)
    assert "exp_avg_sq" not in state and "exp_avg" not in state  # no momentum with beta1=None


def test_matches_transformers_adafactor():
    from transformers.optimization import Adafactor as HFAdafactor

    torch.manual_seed(0)
    shapes = [(8, 6), (7,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = Adafactor(ours, lr=1e-2, weight_decay=0.01)
    opt_hf = HFAdafactor(theirs, lr=1e-2, weight_decay=0.01, relative_step=False, scale_parameter=True, warmup_init=False)
    for step in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a) * (step + 1)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_hf.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_parameter_updates_in_fp32():
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    p.grad = torch.ones(4, 4, dtype=torch.bfloat16)
    Adafactor([p], lr=1e-2).step()
    assert p.dtype == torch.bfloat16 and torch.all(p < 1)
