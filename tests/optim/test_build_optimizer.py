"""build_optimizer: each optimizer from its config name; weight decay only on matrices."""

import pytest
import torch

from t5forge.config_files import load_config
from t5forge.optim.adafactor import Adafactor
from t5forge.optim.adamw_scale import AdamWScale
from t5forge.optim.build import build_optimizer, build_schedule, param_groups
from t5forge.optim.schedules import set_lr
from t5forge.plan import make_plan


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4, bias=True)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)


def test_groups_split_matrices_from_vectors():
    m = Toy()
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.embed.weight), id(m.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


@pytest.mark.parametrize("name, cls", [("adamwscale", AdamWScale), ("adafactor", Adafactor), ("adamw", torch.optim.AdamW)])
def test_weight_decay_touches_only_matrices(name, cls):
    torch.manual_seed(0)
    m = Toy()
    cfg = load_config([f"optim.name={name}", "optim.weight_decay=0.5", "optim.base_lr=0.1"])
    opt = build_optimizer(m, cfg.optim)
    assert isinstance(opt, cls)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # no gradient signal: only weight decay can move a parameter
    opt.step()
    for n, p in m.named_parameters():
        if n in ("embed.weight", "proj.weight"):
            assert torch.all(p.abs() < before[n].abs()), n
        else:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_adamw_uses_nanot5_moments_and_foreach_on_cpu():
    opt = build_optimizer(Toy(), load_config(["task=ft"]).optim)
    g = opt.param_groups[0]
    assert g["lr"] == 5e-5 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-6 and g["foreach"] is True


def test_build_schedule_uses_plan_steps():
    cfg = load_config(["task=ft", "optim.lr_scheduler=linear", "optim.warmup_steps=2"])
    plan = make_plan(cfg, train_examples=40)  # 5 steps x 2 epochs
    lr_at = build_schedule(cfg.optim, total_steps=plan.total_steps)
    assert lr_at(2) == pytest.approx(5e-5) and lr_at(10) == 0.0
    nano = build_schedule(load_config([]).optim)
    assert nano(0) == pytest.approx(1e-2) and nano(10_000) == pytest.approx(2e-2) and nano(65_536) == pytest.approx(1e-5)


def test_a_few_training_steps_lower_the_loss():
    # AdamWScale + nanoT5's schedule on a tiny regression: the whole build path trains something.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x.sum(dim=1, keepdim=True)
    cfg = load_config(["optim.total_steps=100", "optim.warmup_steps=5", "optim.base_lr=0.1"])
    opt, lr_at = build_optimizer(model, cfg.optim), build_schedule(cfg.optim)
    losses = []
    for step in range(100):
        set_lr(opt, lr_at(step))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
