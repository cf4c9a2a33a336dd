"""The speed paths of the plain model (model/t5.py, model/loss.py), as swap-in twins.

    model, loss, report = fast.apply(model, loss, device=device, compiled=False, elementwise=True)

`apply` walks a built model and replaces a module only when its type is EXACTLY a plain class it
knows; the twin is a subclass of that class with the same parameters (the module's class is
swapped in place: names, values and the optimizer's references are unchanged) and the same results
up to float rounding. Anything else (a research subclass of FeedForward, a component from
model/components.py no twin knows) stays as it is and runs at reference speed; the report and
one log line say what was swapped and what was left plain.

    plain class     twin                 what is faster                                 file
    RMSNorm         FastRMSNorm          hand-written backward; compiled stretch (CPU)  norm.py, compiled.py
    Attention       FastAttention        stacked q/k/v matmul under autocast; CPU bias  attention.py, spans.py,
                                         kernel, packed rows as spans, long inputs by   blocked.py, flex.py
                                         query blocks, FlexAttention
    FeedForward     FastFeedForward      stacked wi_0/wi_1 under autocast; compiled     feed_forward.py
                                         gating (CPU)
    PreNormBlock    FastBlock            the (x, delta) fused residual                  stack.py
    Stack           FastStack            the bias in the attention twins' forms         stack.py
    TokenNLL        FastTokenNLL         chunked lm_head + cross-entropy (training)     loss.py

attention_backend (T5Config): "eager" leaves Attention plain (its reference SDPA call); "sdpa" and
"flex" swap in FastAttention, the stack twin preparing the bias in that back end's form.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from t5forge.model.fast.attention import FastAttention
from t5forge.model.fast.feed_forward import FastFeedForward
from t5forge.model.fast.loss import FastTokenNLL
from t5forge.model.fast.norm import FastRMSNorm
from t5forge.model.fast.stack import FastBlock, FastStack
from t5forge.model.loss import TokenNLL
from t5forge.model.per_layer_bias import PerLayerRelativeBias
from t5forge.model.positions import RoPE
from t5forge.model.t5 import T5, Attention, FeedForward, PreNormBlock, RMSNorm, Stack, T5RelativeBias

log = logging.getLogger(__name__)

TWINS: dict[type, type] = {
    RMSNorm: FastRMSNorm,
    Attention: FastAttention,
    FeedForward: FastFeedForward,
    PreNormBlock: FastBlock,
    Stack: FastStack,
    TokenNLL: FastTokenNLL,
}
# Plain classes that run as they are, with no twin: nothing of theirs is slower than it must be
# (a stack with a table per layer keeps the dense bias form: _bias_forms).
# RoPE's rotation runs inside the attention twins (FastAttention rotates after its stacked q/k/v).
_NO_TWIN_NEEDED = (T5, T5RelativeBias, PerLayerRelativeBias, RoPE)


@dataclass
class Conversion:
    """What `apply` did: plain class name -> count swapped, and `left_plain`: module class -> count
    of the model's own (non-torch.nn) modules left as they are, with the reason in the key."""

    swapped: Counter = field(default_factory=Counter)
    left_plain: Counter = field(default_factory=Counter)
    elementwise: bool = False  # the twins' elementwise stretches run compiled (fast/compiled.py)
    compiled: bool = False  # the whole model is to run under torch.compile
    fused_residual: list = field(default_factory=list)  # the stacks that run the (x, delta) loop
    bias_forms: list = field(default_factory=list)  # the stacks whose attention reads the twins' forms

    def line(self) -> str:
        swapped = ", ".join(f"{n} x{c}" for n, c in sorted(self.swapped.items())) or "nothing"
        plain = ", ".join(f"{n} x{c}" for n, c in sorted(self.left_plain.items())) or "nothing"
        stacks = f"fused residual: {', '.join(self.fused_residual) or 'none'}; " \
                 f"attention bias forms: {', '.join(self.bias_forms) or 'none'}"
        return f"speed twins: swapped {swapped}; left plain {plain}; {stacks}"


def apply(model: nn.Module, loss: nn.Module | None = None, *, device, compiled: bool = False,
          elementwise: bool = False):
    """Swap the twins into `model` (a built, unwrapped T5, before DDP / torch.compile) and `loss` (a
    TokenNLL or None), in place; returns (model, loss, Conversion).

    device: where the model trains; compiled: the whole model will be torch.compile'd (the twins
    then trace as part of its graph; the spans and the compiled stretches stand aside inside it);
    elementwise: run the norm and gating stretches torch.compile'd on CPU while training
    (fast/compiled.py `wanted` resolves model.compile_elementwise to this)."""
    report = Conversion(elementwise=bool(elementwise), compiled=bool(compiled))
    backend = getattr(getattr(model, "config", None), "attention_backend", "sdpa")
    modules = list(model.modules()) + ([loss] if loss is not None else [])
    for module in modules:
        kind = type(module)
        twin = TWINS.get(kind)
        if twin is not None:
            if kind is Attention and backend == "eager":
                report.left_plain["Attention (attention_backend=eager)"] += 1
                continue
            module.__class__ = twin
            if hasattr(twin, "compiled"):
                module.compiled = bool(elementwise)
            report.swapped[kind.__name__] += 1
        elif kind in TWINS.values() or kind in _NO_TWIN_NEEDED:
            continue  # a twin already, or nothing to swap
        elif not kind.__module__.startswith("torch."):
            reason = next((f"subclass of {base.__name__}" for base in TWINS if isinstance(module, base)),
                          "no twin")
            report.left_plain[f"{kind.__name__} ({reason})"] += 1
    for name, stack in model.named_modules():
        if type(stack) is FastStack:
            stack.fused_residual = _fused_residual(stack)
            stack.bias_forms = _bias_forms(stack)
            if stack.fused_residual:
                report.fused_residual.append(name)
            if stack.bias_forms:
                report.bias_forms.append(name)
    # (Under torch.compile the twins trace into its graph; the spans and the compiled stretches stand
    # aside there by themselves, torch.compiler.is_compiling(), so `compiled` changes no swap.)
    log.info("%s (%s%s%s)", report.line(), torch.device(device).type,
             ", elementwise stretches compiled" if elementwise else "",
             ", inside torch.compile of the whole model" if compiled else "")
    return model, loss, report


def _fused_residual(stack: FastStack) -> bool:
    """Every block a FastBlock whose norms, and the stack's final norm, are FastRMSNorm."""
    norms = [stack.final_norm]
    for block in stack.blocks:
        if type(block) is not FastBlock:
            return False
        norms += [block.attn_norm, block.ff_norm] + ([block.cross_norm] if block.is_decoder else [])
    return all(type(norm) is FastRMSNorm for norm in norms)


def _bias_forms(stack: FastStack) -> bool:
    """Every block a plain or twin pre-norm block whose attention modules are twins, and the
    position scheme exactly T5RelativeBias: only then may the bias leave its dense form."""
    if type(stack.position) is not T5RelativeBias:
        return False
    for block in stack.blocks:
        if type(block) not in (PreNormBlock, FastBlock):
            return False
        attns = [block.attn] + ([block.cross_attn] if block.is_decoder else [])
        if any(type(a) is not FastAttention for a in attns):
            return False
    return True


def enabled_in(model: nn.Module) -> bool:
    """Whether `model` runs its elementwise stretches compiled (apply(..., elementwise=True))."""
    return any(getattr(module, "compiled", False) is True for module in model.modules())
