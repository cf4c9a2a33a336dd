"""Build the optimizer and the lr schedule named by `optim.*`.

    optimizer = build_optimizer(model, cfg.optim)
    lr_at = build_schedule(cfg.optim, total_steps=plan.total_steps)
    set_lr(optimizer, lr_at(plan.schedule_step(state.step, elapsed)))   # each step, then optimizer.step()

Weight decay applies to matrices only (p.dim() >= 2: projections and embeddings), never to the
RMSNorm scales (nanoGPT's rule; for T5, which has no biases, this is the same split as nanoT5's
name list). Moment settings are nanoT5's: betas (0.9, 0.999) and eps 1e-6 for both AdamW variants.
"""

import torch

from t5forge.optim.adafactor import Adafactor
from t5forge.optim.adamw_scale import AdamWScale
from t5forge.optim.schedules import make_schedule

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6  # transformers' AdamW default, which nanoT5 uses (torch's default is 1e-8)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and everything else (not decayed); frozen parameters left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """The optimizer of `optim.name` at lr optim.base_lr (the schedule overwrites the lr every step)."""
    groups = [g for g in param_groups(model, optim_cfg.weight_decay) if g["params"]]
    name = optim_cfg.name
    if name == "adamwscale":
        return AdamWScale(groups, lr=optim_cfg.base_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    if name == "adafactor":
        return Adafactor(groups, lr=optim_cfg.base_lr)
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        # fused: one kernel for all parameters on GPU; foreach (multi-tensor) elsewhere.
        fast = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(groups, lr=optim_cfg.base_lr, betas=ADAM_BETAS, eps=ADAM_EPS, **fast)
    raise ValueError(f"unknown optimizer {name!r}")


def build_schedule(optim_cfg, total_steps: int | None = None):
    """`step -> lr` for optim.lr_scheduler; `total_steps` from the Plan (epochs may set it)."""
    return make_schedule(
        optim_cfg.lr_scheduler,
        base_lr=optim_cfg.base_lr,
        warmup_steps=optim_cfg.warmup_steps,
        total_steps=optim_cfg.total_steps if total_steps is None else total_steps,
        final_lr=optim_cfg.final_cosine,
    )
