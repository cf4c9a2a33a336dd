"""The matmul-bound time of a training step: every matmul-like kernel call of one step, replayed alone.

MFU is measured against the best square matmul the device runs. A training step's matmuls are not
square: T5's attention multiplies (L x 64) heads, the feed-forward's weight gradients reduce over
thousands of tokens, the lm_head's output is 32128 wide. How fast those particular calls can run
bounds the step's MFU, whatever happens between them. This module records the matmul-like calls of
one step (mm, addmm, bmm, baddbmm and the fused SDPA kernels, forward and backward) with their
shapes, strides and dtypes, replays each on fresh tensors of the same layout, and sums the times.

    calls = record_matmuls(lambda: trainer.step(record=False))
    seconds = sum(replay_times(calls, device))    # the step's matmuls alone, each in isolation
    mfu_bound = flops_per_step / seconds / peak   # the step's MFU if nothing else took time

A replayed call finds its inputs in cache more often than inside the step, so this is an optimistic
bound (an upper bound on MFU): the gap between it and the measured step is the time outside the
matmuls (norms, activations, softmax, optimizer, memory traffic) plus the matmuls' in-step slowdown.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN = torch.ops.aten
# Packets whose overloads (default, out) count as matmul-like: the kernels model FLOPs are made of.
_MATMUL_PACKETS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_forward",
                   "_flash_attention_backward", "_efficient_attention_forward", "_efficient_attention_backward")
MATMUL_PACKETS = {getattr(_ATEN, name) for name in _MATMUL_PACKETS if hasattr(_ATEN, name)}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str  # some kernels take small host tensors (e.g. the RNG state of GPU flash attention)


@dataclass(frozen=True)
class Call:
    op: torch._ops.OpOverload
    args: tuple
    kwargs: tuple  # (name, value) pairs; tensors as TensorSpec


def _spec(x):
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    if isinstance(x, (list, tuple)):  # a tuple either way: a Call must be hashable
        return tuple(_spec(v) for v in x)
    return x


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMUL_PACKETS:
            self.calls.append(Call(func, _spec(tuple(args)), tuple((k, _spec(v)) for k, v in kwargs.items())))
        return func(*args, **kwargs)


def record_matmuls(step) -> list[Call]:
    """The matmul-like calls one run of `step()` makes (forward and backward), in order."""
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.calls


def _materialise(x, generator):
    if isinstance(x, TensorSpec):
        t = torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=x.device)
        if x.dtype.is_floating_point:  # small normal values: no subnormals, no overflow in softmax kernels
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(0.1))
        else:
            t.zero_()
        return t
    if isinstance(x, (list, tuple)):
        return type(x)(_materialise(v, generator) for v in x)
    return x


def replay_times(calls: list[Call], device: torch.device, repeats: int = 3) -> list[float]:
    """Each call's median time in seconds when run alone (after one untimed run) on `device`, where
    the step ran (its tensors are made where the step had them)."""
    generator = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    cache: dict[Call, float] = {}  # identical calls (same op, layout, arguments) are timed once
    for call in calls:
        if call not in cache:
            args = _materialise(call.args, generator)
            kwargs = {k: _materialise(v, generator) for k, v in call.kwargs}
            times = []
            for i in range(repeats + 1):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                call.op(*args, **kwargs)
                if cuda:
                    torch.cuda.synchronize(device)
                if i:
                    times.append(time.perf_counter() - start)
            cache[call] = statistics.median(times)
            del args, kwargs
    return [cache[call] for call in calls]
