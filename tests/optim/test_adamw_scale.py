"""AdamWScale against nanoT5's update rule, written out independently in numpy (float64)."""

import math

import numpy as np
import pytest
import torch

from t5forge.optim.adamw_scale import AdamWScale


def reference_adamw_scale(p0, grads, lr, wd, betas=(0.9, 0.999), eps=1e-6):
    """nanoT5 copied_utils.AdamWScale, step by step: bias-corrected Adam step x max(1e-3, RMS(p)), then decay."""
    b1, b2 = betas
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        rms = np.sqrt(np.mean(p * p))
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * max(1e-3, rms)
        p = p - step_size * m / (np.sqrt(v) + eps)
        p = p - lr * wd * p
    return p


IMPLEMENTATIONS = AdamWScale.IMPLEMENTATIONS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_reference_over_several_steps(wd, implementation):
    rng = np.random.default_rng(0)
    shapes = {"matrix": (5, 3), "vector": (4,), "tiny_rms": (6,)}
    init = {k: rng.normal(size=s) for k, s in shapes.items()}
    init["tiny_rms"] *= 1e-5  # RMS below the 1e-3 floor: the floor must kick in
    grads = {k: [rng.normal(size=s) for _ in range(5)] for k, s in shapes.items()}

    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    opt = AdamWScale(list(params.values()), lr=2e-2, weight_decay=wd, implementation=implementation)
    for i in range(5):
        for k, p in params.items():
            p.grad = torch.tensor(grads[k][i])
        opt.step()
    for k, p in params.items():
        expected = reference_adamw_scale(init[k], grads[k], lr=2e-2, wd=wd)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-10, atol=1e-14)
        assert not np.allclose(expected, init[k])


def test_first_step_size_is_lr_times_rms():
    # Step 1 with g = 1: m = 0.1, sqrt(v) = sqrt(1e-3), bias corrections sqrt(1e-3) / 0.1, so the update is
    # lr * RMS(p) * sqrt(1e-3) / (sqrt(1e-3) + eps): lr times the RMS, up to eps.
    p = torch.nn.Parameter(torch.full((10,), 2.0, dtype=torch.float64))
    p.grad = torch.ones(10, dtype=torch.float64)
    AdamWScale([p], lr=0.1).step()
    np.testing.assert_allclose(p.detach().numpy(), 2.0 - 0.1 * 2.0 / (1 + 1e-6 / math.sqrt(1e-3)), rtol=1e-12)


def test_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = AdamWScale([a], lr=1e-2, weight_decay=0.01), AdamWScale([b], lr=1e-2, weight_decay=0.01)
    grads = [torch.randn(4, 4) for _ in range(4)]
    for g in grads[:2]:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    opt_c = AdamWScale([b], lr=1e-2, weight_decay=0.01)
    opt_c.load_state_dict(opt_b.state_dict())
    for g in grads[2:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_c.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_implementation_is_fused_on_cpu():
    assert AdamWScale([torch.nn.Parameter(torch.ones(2))]).implementation is None  # chosen per device
    with pytest.raises(ValueError, match="implementation"):
        AdamWScale([torch.nn.Parameter(torch.ones(2))], implementation="fast")


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_implementations_agree_with_the_loop_in_mixed_precision_groups(implementation):
    # One group holding fp32 and bf16 parameters (foreach kernels group them by dtype internally);
    # one parameter without a gradient is skipped.
    torch.manual_seed(0)
    shapes, dtypes = [(64, 32), (32,), (8, 8)], [torch.float32, torch.bfloat16, torch.float32]
    ref = [torch.nn.Parameter(torch.randn(s).to(d)) for s, d in zip(shapes, dtypes)]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    frozen = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    opt_ref = AdamWScale(ref + frozen[:1], lr=1e-2, weight_decay=0.1, implementation="loop")
    opt = AdamWScale(got + frozen[1:], lr=1e-2, weight_decay=0.1, implementation=implementation)
    start = [p.detach().float().clone() for p in ref]
    for _ in range(3):
        for a, b in zip(ref, got):
            g = torch.randn(a.shape).to(a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for a, b, s in zip(ref, got, start):
        tol = {"rtol": 1e-5, "atol": 1e-6} if a.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(b.float(), a.float(), **tol)
        assert (a.float() - s).abs().max() > 1e-3
    assert torch.equal(frozen[1], torch.ones(3)) and not opt.state[frozen[1]]
