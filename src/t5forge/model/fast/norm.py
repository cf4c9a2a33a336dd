"""The RMSNorm twin: the plain norm's formula with its backward written out, and, while training on
CPU with `compiled` set, the norm (or the residual add and the norm) as one compiled loop."""

from __future__ import annotations

import torch

from t5forge.model.fast import compiled as stretches
from t5forge.model.t5 import RMSNorm


class FastRMSNorm(RMSNorm):
    """RMSNorm with `_RMSNormFunction`'s backward; `add_forward` for the fused residual (fast/stack.py).
    `compiled`: take the torch.compile'd stretch where fast/compiled.py's rule allows (fast.apply sets it)."""

    compiled = False

    def forward(self, x):
        if stretches.use_compiled(x, self.compiled):
            return stretches.compiled_rms_norm(x, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def add_forward(self, x, delta):  # -> (x + delta, norm(x + delta)); delta None: (x, norm(x))
        if delta is None:
            return x, self(x)
        if stretches.use_compiled(x, self.compiled):  # the residual add and the norm in one loop
            return stretches.compiled_add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out. The autograd graph of the formula reads and writes
    activation-sized tensors ~16 times per norm, this ~10 times (F.rms_norm is no faster on CPU in
    torch 2.13; benchmarks/performance.md). dx = rstd * (g - xhat * mean(g * xhat)) with
    g = dy * weight, xhat = x * rstd; dweight = sum over rows of dy * xhat."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
        rstd = sum_sq.div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1) fp32
        y = x * rstd
        if weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(weight.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd  # fp32
        dweight = (dy * xhat).sum(dim=tuple(range(dy.dim() - 1)))
        g = (dy * weight).float()
        mean_gx = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
        dx = g.sub_(xhat.mul_(mean_gx)).mul_(rstd)
        return dx.to(x.dtype), dweight.to(weight.dtype), None
