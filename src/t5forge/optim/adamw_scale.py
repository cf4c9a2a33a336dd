"""AdamWScale: nanoT5's AdamW whose step is scaled by each parameter's RMS (Adafactor's relative step).

For a parameter p with gradient g, at step t (1-based), lr and weight decay wd of its group:

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    step = lr * sqrt(1 - b2^t) / (1 - b1^t) * max(1e-3, RMS(p))     # RMS(p) = ||p||_2 / sqrt(numel), before the update
    p = p - step * m / (sqrt(v) + eps)
    p = p - lr * wd * p                   # decoupled decay, after the update, not scaled by RMS

Scaling by RMS(p) makes base_lr a relative step size, which is why nanoT5 trains T5 with lr 2e-2.
"""

import math

import torch


class AdamWScale(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdamWScale does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(eps)

                step_size = lr
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                # A 0-d tensor, so the RMS never leaves the device (no host sync per parameter).
                wide = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else None
                rms = torch.linalg.vector_norm(p, dtype=wide) / math.sqrt(p.numel())
                scale = rms.clamp(min=1e-3).mul_(-step_size).to(p.dtype)
                p.add_(exp_avg.div(denom).mul_(scale))
                if wd > 0.0:
                    p.mul_(1.0 - lr * wd)
        return loss
