"""The T5 block's elementwise stretches, each compiled on its own with torch.compile: CPU training.
The norm and feed-forward twins (fast/norm.py, fast/feed_forward.py) call them when their `compiled`
flag is set (`fast.apply(..., elementwise=True)`).

Between the matmuls, a T5 training step is a chain of memory-bound passes: the residual add, the
RMSNorm (a reduction, two multiplies and their backward), the gated activation (GELU, a multiply and
their backward). In eager PyTorch each is its own pass over an activation-sized tensor; compiled, each
stretch is one generated C++ loop, forward and backward. Only these stretches are compiled: the
matmuls and the attention kernels stay eager, where torch.compile of the whole model on CPU gained
nothing. The measurements, per stretch and per step: benchmarks/performance.md.

Used while training on CPU on activations of MIN_ELEMENTS or more (`fast.apply(..., elementwise=True)`;
`t5forge pretrain` / `finetune` turn it on there when the residual stream is that large, unless
model.compile compiles everything; see `wanted`); no-grad
passes (evaluation, generation) run eager, so decoding does not recompile per step. The formulas
are HF's T5LayerNorm and gated feed-forward, so results equal the eager path's up to float
rounding. If compiling fails (e.g. no C++ compiler), a warning says so and the eager path takes
over for the rest of the process.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x, weight, eps: float):
    """HF's T5LayerNorm: variance in fp32, the result cast to a half weight's dtype before scaling."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


def add_rms_norm(x, delta, weight, eps: float):
    """(x + delta, rms_norm(x + delta)): a residual add and the norm that reads its result."""
    total = x + delta
    return total, rms_norm(total, weight, eps)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF's gelu_new, what gated-gelu means
    "silu": F.silu,
}


def gated(gate, linear, activation: str):
    """act(gate) * linear: a gated feed-forward's hidden state."""
    return ACTIVATIONS[activation](gate) * linear


class Compiled:
    """fn compiled on first use; fn itself when compiling is unavailable or has failed once.
    (backend: torch.compile's; the default inductor generates the fused C++ loops.)"""

    def __init__(self, fn, backend: str = "inductor"):
        self.fn, self.backend, self.compiled, self.failed = fn, backend, None, False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, backend=self.backend)
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001  (any backend failure: fall back rather than stop training)
            self.failed = True
            log.warning("compiling %s failed (%s: %s); running it eagerly from now on", self.fn.__name__,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return self.fn(*args)


compiled_rms_norm = Compiled(rms_norm)
compiled_add_rms_norm = Compiled(add_rms_norm)
compiled_gated = Compiled(gated)


def wanted(setting: bool | None, device: torch.device, whole_model_compiled: bool,
           stream_elements: int | None = None) -> bool:
    """model.compile_elementwise resolved: null = on for training on CPU, unless the whole model is
    compiled (its graph fuses these stretches itself) or the run's residual stream (`stream_elements`
    = micro-batch x input length x d_model, when known) is below MIN_ELEMENTS. The per-tensor rule of
    use_compiled alone would still compile a small model's gated activation (d_ff wide: pt_cpu's
    16 x 128 x 512 is 1M elements) and pay the compile start-up for a step time that does not move.
    The stretches run compiled on CPU only."""
    if setting is not None:
        return setting
    if stream_elements is not None and stream_elements < MIN_ELEMENTS:
        return False
    return device.type == "cpu" and not whole_model_compiled


# Activations smaller than this stay eager. The fused loops save passes over memory, which pays where
# an activation is a few MB: t5-v1.1-small's 8 x 512 x 512 encoder and 8 x 114 x 512 decoder states
# (467k elements) go compiled. At the pt_cpu preset's 16 x 128 x 128 (262k) the step time does not
# move while its first step pays the compile start-up (benchmarks/performance.md), so there (see
# `wanted`) nothing is compiled.
MIN_ELEMENTS = 400_000


def use_compiled(x: torch.Tensor, enabled: bool) -> bool:
    """Whether a twin whose `compiled` flag is `enabled` takes the compiled stretch for x:
    training on CPU, outside an already compiled model (whose graph fuses these stretches itself),
    on an activation of at least MIN_ELEMENTS."""
    return (enabled and x.device.type == "cpu" and x.numel() >= MIN_ELEMENTS and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())
