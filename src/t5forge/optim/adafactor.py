"""Adafactor with T5's original settings (Shazeer & Stern 2018; mesh_tensorflow / HF `Adafactor`).

For a parameter p with gradient g at step t (1-based), group lr (the relative step size rho_t):

    beta2_t = 1 - t^decay_rate                                  # decay_rate = -0.8
    G = g^2 + eps1                                              # eps1 = 1e-30
    factored (p.dim() >= 2, on the last two dims):
        R = beta2_t R + (1 - beta2_t) mean(G, -1)               # row statistics
        C = beta2_t C + (1 - beta2_t) mean(G, -2)               # column statistics
        V = (R / mean(R, -1)) outer C
    otherwise:  V = beta2_t V + (1 - beta2_t) G
    U = g / sqrt(V);   U = U / max(1, RMS(U) / clip_threshold)  # clip_threshold = 1.0
    if beta1 is not None: M = beta1 M + (1 - beta1) U; U = M    # T5 uses no momentum (beta1 None)
    alpha = lr * max(eps2, RMS(p)) if scale_parameter else lr   # eps2 = 1e-3, RMS(p) before the update
    p = p - alpha * wd * p - alpha * U

T5's "relative step" rho_t = min(1e-2, 1/sqrt(t)) is not hidden in the optimizer: it is the lr
schedule `inverse_sqrt` with base_lr 1e-2 and warmup_steps 10000 (see optim/schedules.py), so the
lr stays a pure function of the step like every other schedule in t5forge.

Sharded parameters (FSDP2's DTensors, rows split over the ranks) run the same code: DTensor's
reductions take each mean and RMS over the whole parameter, so the column statistics, RMS(U) and
RMS(p) are the unsharded ones (the factored statistics are kept replicated: they are small).
tests/distributed/test_sharded_optimizers.py holds this equal to one process on uneven shards.
"""

import torch


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    # Half-precision parameters are updated in fp32 (as HF's Adafactor does); fp32/fp64 stay as they are.
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1=None, weight_decay: float = 0.0, scale_parameter: bool = True):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"invalid beta1 {beta1}")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                dtype = _compute_dtype(p)
                grad = p.grad.to(dtype)
                factored = grad.dim() >= 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                state["step"] += 1
                beta2t = 1.0 - state["step"] ** group["decay_rate"]

                sq = grad.square().add_(eps1)
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.lerp_(sq.mean(dim=-1), 1.0 - beta2t)
                    col.lerp_(sq.mean(dim=-2), 1.0 - beta2t)
                    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    update = grad * row_factor * col.rsqrt().unsqueeze(-2)
                else:
                    v = state["exp_avg_sq"]
                    v.lerp_(sq, 1.0 - beta2t)
                    update = grad * v.rsqrt()
                update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                if group["beta1"] is not None:
                    update = state["exp_avg"].lerp_(update, 1.0 - group["beta1"])

                p_work = p.to(dtype)  # p itself unless p is half precision
                if group["scale_parameter"]:
                    alpha = _rms(p_work).clamp(min=eps2) * group["lr"]  # 0-d tensor: no host sync
                    if group["weight_decay"] > 0.0:
                        p_work.sub_(p_work * (alpha * group["weight_decay"]))
                    p_work.sub_(update * alpha)
                else:  # a plain float: no tensor built from it (a host-to-device copy per parameter)
                    if group["weight_decay"] > 0.0:
                        p_work.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p_work.sub_(update, alpha=group["lr"])
                if p_work is not p:
                    p.copy_(p_work)
        return loss
