"""Schedules against their definitions, and nanoT5's cosine/legacy against the torch schedulers it uses."""

import math

import pytest
import torch

from t5forge.optim.schedules import Constant, Cosine, InverseSqrt, Legacy, Linear, make_schedule, set_lr


def test_cosine_at_chosen_steps():
    s = Cosine(base_lr=2e-2, warmup_steps=100, total_steps=1100, final_lr=1e-5)
    assert s(0) == pytest.approx(1e-2)  # nanoT5's LinearLR starts at 0.5 x base_lr
    assert s(50) == pytest.approx(1.5e-2)
    assert s(100) == pytest.approx(2e-2)  # warmup end = peak
    assert s(600) == pytest.approx(1e-5 + (2e-2 - 1e-5) / 2)  # mid-cosine
    assert s(1100) == pytest.approx(1e-5) and s(5000) == pytest.approx(1e-5)  # end = final_cosine, then flat
    assert s(600.5) < s(600) < s(599.5)  # fractional steps (time budgets)


def _nanot5_cosine_torch(base_lr, warmup, total, final):
    """nanoT5 model_utils.get_lr_scheduler('cosine'), built from the same torch schedulers."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=[
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, end_factor=1, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=final),
    ], milestones=[warmup])
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])  # the lr optimizer.step() sees, then lr_scheduler.step()
        opt.step()
        sched.step()
    return lrs


def test_cosine_equals_nanot5_torch_schedulers():
    base, warmup, total, final = 2e-2, 20, 120, 1e-5
    expected = _nanot5_cosine_torch(base, warmup, total, final)
    ours = Cosine(base, warmup, total, final)
    for step, lr in enumerate(expected):
        assert ours(step) == pytest.approx(lr, rel=1e-6, abs=1e-12), step


def test_legacy_equals_nanot5_torch_schedulers():
    base, total = 2e-2, 200
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    n1 = math.ceil(total * 0.9)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=[
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1e-2, 1.0 / math.sqrt(s)) / base if s else 1e-2 / base),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=min(1e-2, 1.0 / math.sqrt(n1)) / base, end_factor=0,
                                          total_iters=total - n1),
    ], milestones=[n1])
    ours = Legacy(total)
    for step in range(total):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()
    assert ours(total) == 0.0


def test_legacy_definition():
    s = Legacy(total_steps=1_000_000)
    assert s(0) == 1e-2 and s(100) == 1e-2 and s(10_000) == pytest.approx(1e-2)
    assert s(40_000) == pytest.approx(1 / 200)


def test_inverse_sqrt_is_t5_relative_step():
    s = InverseSqrt(base_lr=1e-2, warmup_steps=10_000)
    for step in [1, 10, 9_999, 10_000, 10_001, 40_000, 1e6, 123_456.5]:
        assert s(step) == pytest.approx(min(1e-2, 1 / math.sqrt(step)), rel=1e-12)
    assert s(0) == 1e-2
    assert InverseSqrt(base_lr=3e-3, warmup_steps=100)(400) == pytest.approx(3e-3 / 2)


def test_constant_and_linear():
    assert Constant(5e-5)(0) == 5e-5 and Constant(5e-5)(1e9) == 5e-5
    c = Constant(1e-3, warmup_steps=10)
    assert c(0) == 0.0 and c(5) == pytest.approx(5e-4) and c(10) == 1e-3
    lin = Linear(1e-3, warmup_steps=10, total_steps=110)
    assert lin(0) == 0.0 and lin(10) == pytest.approx(1e-3) and lin(60) == pytest.approx(5e-4)
    assert lin(110) == 0.0 and lin(500) == 0.0


def test_make_schedule_and_set_lr():
    s = make_schedule("cosine", base_lr=1.0, warmup_steps=0, total_steps=10, final_lr=0.0)
    assert s(0) == 1.0 and s(5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_schedule("step", base_lr=1.0, warmup_steps=0, total_steps=10)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
