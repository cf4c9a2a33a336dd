"""What one training step needs in memory, and a clear refusal before any work when it cannot fit.

    estimate = weights + gradients + optimizer states                  4 B x params x (2 + states)
             + saved activations                                       act B x floats below
             + attention's saved (B, H, Q, K) tensors (dense path)     or (B, H, Q) (query blocks)
             + the logits and their gradient                           8 B x batch x targets x vocab

Saved activations per layer and token (floats; d = d_model, i = heads x d_kv, f = d_ff, g = 2 for a
gated feed-forward, else 1): encoder 8d + 4i + (2g + 1)f; decoder 11d + 6i + (2g + 1)f per target
token plus 2i per source token (the cross-attention keys and values). act = 4 bytes in fp32, 2 under
bf16 autocast (the matmul outputs; the norms keep fp32 copies, which is part of why the estimate is
rounded up by ESTIMATE_SLACK). The dense path keeps each layer's probabilities (B, H, Q, K) and,
while one layer's softmax runs, its scores: 2 x B x H x Q x K x 4 bytes per layer, plus the stack's
bias. The query-block path (model/fast/blocked.py) keeps a log-sum-exp per query and one block's
scores at a time. With model.activation_checkpointing=full a block keeps only its input (d floats
per token) and one block's activations exist at a time; "selective" keeps half of them.

It counts the big terms only, so it is compared with the memory available with no further margin:
a step is refused only when the estimate alone exceeds what is free. Against the measured peak
resident memory of t5-v1.1-small's forward + backward (benchmarks/results/long_inputs-cpu-*.md,
runtime included) it reads 0.9x at 1k-2k tokens and 1.4x at 16k (its activation term counts more
than the twins keep at that length): a refusal near the limit errs on the side of caution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config

GiB = 2**30
ESTIMATE_SLACK = 1.1  # allocator fragmentation, the framework itself, temporaries of the largest op


@dataclass(frozen=True)
class StepMemory:
    weights_and_optimizer: float
    activations: float
    attention: float
    logits: float

    @property
    def total(self) -> float:
        return ESTIMATE_SLACK * (self.weights_and_optimizer + self.activations + self.attention + self.logits)

    def line(self) -> str:
        return (f"{self.total / GiB:.1f} GiB (weights, gradients and optimizer {self.weights_and_optimizer / GiB:.1f}, "
                f"activations {self.activations / GiB:.1f}, attention {self.attention / GiB:.1f}, "
                f"logits {self.logits / GiB:.1f}; x{ESTIMATE_SLACK} slack)")


def estimate_step(config: T5Config, params: int, batch: int, input_len: int, target_len: int, *,
                  precision: str = "fp32", optimizer_states: int = 2, blocked: bool | None = None,
                  training: bool = True, checkpointing: str = "none") -> StepMemory:
    """The estimate of one forward + backward (training) or forward (not training) of a micro-batch.
    blocked: whether the encoder attention goes by query blocks; None: as the sdpa twins decide.
    checkpointing: model.activation_checkpointing; "full" keeps each block's input (d floats per
    token and layer) plus one block's activations at a time, "selective" half of the blocks'."""
    from t5forge.model.fast.blocked import use_blocks

    act = 2 if precision == "bf16" else 4
    d, i, f, H = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.num_heads
    g = 2 if config.is_gated else 1
    enc_token = 8 * d + 4 * i + (2 * g + 1) * f
    dec_token = 11 * d + 6 * i + (2 * g + 1) * f
    activations = act * batch * (config.num_layers * input_len * enc_token
                                 + config.num_decoder_layers * (target_len * dec_token + input_len * 2 * i))
    if checkpointing == "full":
        layers = config.num_layers + config.num_decoder_layers
        one_block = max(input_len * enc_token, target_len * dec_token + input_len * 2 * i)
        activations = act * batch * (layers * max(input_len, target_len) * d + one_block)
    elif checkpointing == "selective":
        activations /= 2
    if blocked is None:
        blocked = config.attention_backend != "eager" and use_blocks(input_len, input_len)
    if blocked:  # a log-sum-exp per query per layer, one block of scores, the band
        enc_attention = 4 * batch * H * input_len * config.num_layers + 4 * 3 * 2**22 + 4 * H * 256 * 2 * input_len
    else:
        enc_attention = 4 * batch * H * input_len**2 * (config.num_layers + 2)
    dec_attention = 4 * batch * H * target_len * (target_len + input_len) * (config.num_decoder_layers + 1)
    logits = 8 * batch * target_len * config.vocab_size
    weights = 4 * params * ((2 + optimizer_states) if training else 1)
    if not training:  # nothing is kept for a backward pass: one layer's worth at a time
        activations /= max(config.num_layers, 1)
        enc_attention /= max(config.num_layers + 2, 1)
        dec_attention /= max(config.num_decoder_layers + 1, 1)
    return StepMemory(weights, activations, enc_attention + dec_attention, logits)


def available_bytes(device: torch.device) -> float:
    """Free memory for this process: CUDA's free device memory, or on a CPU the kernel's MemAvailable
    (and the cgroup's remaining limit, when the process runs under one), shared among the ranks of
    this host (LOCAL_WORLD_SIZE)."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    free = float("inf")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.exists() and used.exists() and limit.read_text().strip() != "max":
        free = min(free, int(limit.read_text()) - int(used.read_text()))
    return free / max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def check_step_fits(config: T5Config, params: int, batch: int, input_len: int, target_len: int, device, *,
                    precision: str = "fp32", optimizer_states: int = 2, training: bool = True,
                    checkpointing: str = "none") -> StepMemory:
    """The estimate, or a T5ForgeError saying what does not fit and what to do, before any step runs."""
    need = estimate_step(config, params, batch, input_len, target_len, precision=precision,
                         optimizer_states=optimizer_states, training=training, checkpointing=checkpointing)
    free = available_bytes(device)
    if need.total > free:
        blocked_note = "" if config.attention_backend != "eager" else \
            "; model.attention=sdpa attends by query blocks (memory linear in the length)"
        gpu_note = " model.attention=flex (FlexAttention, no dense bias)," if torch.device(device).type == "cuda" else ""
        raise T5ForgeError(
            f"a micro-batch of {batch} x {input_len} input / {target_len} target tokens needs about {need.line()}, "
            f"but {free / GiB:.1f} GiB is free on {torch.device(device)}; lower the micro-batch (a larger "
            f"optim.grad_acc keeps the batch), shorten the inputs (data.input_length / finetune.max_seq_len),"
            f"{gpu_note} or recompute activations in the backward (model.activation_checkpointing=full){blocked_note}"
        )
    return need
