"""The TokenNLL twin: the output projection and the token cross-entropy in one pass, without the
(N, V) logits, while training (grad enabled); the plain TokenNLL (model/loss.py) otherwise.

With a 32k vocabulary the logits of a batch are the largest tensor of a T5 training step (8 x 114
targets x 32128 x 4 bytes = 117 MB at t5-v1.1-small), and the plain path writes and reads it
several times: the lm_head matmul, log_softmax, the loss, and their backward passes. Here the rows
are processed in chunks small enough for a chunk's logits to stay in cache, and the gradients
are computed right away, while the chunk is hot:

    logits = x_c @ W^T                       (n, V) fp32
    loss  += sum(logsumexp(logits) - logits[label])
    dlogits = softmax(logits) - onehot(label)          in place, ignored rows zeroed
    dx_c    = dlogits @ W        dW += dlogits^T @ x_c

backward() then only scales the stored gradients by the incoming gradient of the loss. The matmul
FLOPs are the same as the plain path's (forward + both backward matmuls); only memory traffic is
saved.
"""

from __future__ import annotations

import threading

import torch

from t5forge.model.loss import IGNORE_INDEX, TokenNLL
from t5forge.model.masks import compute_dtype

# CPU only: the logits buffers of the last call (one per dtype), per thread, reused by the next
# one. A fresh 64 MB buffer every step costs its page faults again, and the first chunk's matmul
# runs measurably slower on them (benchmarks/performance.md). The buffers never leave forward.
# CUDA's caching allocator already reuses memory.
_workspace = threading.local()


def _logits_buffer(rows: int, vocab: int, dtype, device) -> torch.Tensor:
    if device.type != "cpu" or torch.compiler.is_compiling():  # a compiled graph plans its own memory
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < rows * vocab:
        buffers[dtype] = buf = None  # drop the old one before allocating its successor
        buf = buffers[dtype] = torch.empty(rows * vocab, dtype=dtype)
    return buf[: rows * vocab].view(rows, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk_rows: int, compute_dtype):
        # x: (N, C); weight: (V, C); labels: (N,) with IGNORE_INDEX = no loss -> summed loss (fp32)
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if want_dx else None
        dw = None  # (V, C) fp32, written by the first chunk: no separate zero-fill pass over it
        # One logits buffer for all chunks (and, on CPU, all calls): fresh pages cost page faults.
        # Half-precision matmuls get an fp32 one beside it for the softmax.
        rows = min(chunk_rows, x.shape[0])
        buffer = _logits_buffer(rows, w.shape[0], compute_dtype, x.device)
        buffer32 = buffer if compute_dtype == torch.float32 else _logits_buffer(
            rows, w.shape[0], torch.float32, x.device)
        for start in range(0, x.shape[0], chunk_rows):
            xc = x[start:start + chunk_rows].to(compute_dtype)
            yc = labels[start:start + chunk_rows]
            n = xc.shape[0]
            logits = torch.mm(xc, w.t(), out=buffer[:n])  # (n, V)
            if logits.dtype != torch.float32:
                logits = buffer32[:n].copy_(logits)
            valid = yc != IGNORE_INDEX
            target = yc.clamp(min=0)[:, None]  # ignored rows read class 0; their loss is masked out
            target_logit = logits.gather(1, target).squeeze(1)
            row_max = logits.amax(dim=-1, keepdim=True)
            # Unnormalised softmax, in place of the logits. The clamp changes nothing that counts
            # (exp(-80) < 1e-34 against a row sum >= 1) but keeps exp off its slow path for
            # underflowing inputs: at T5's init (logits with std ~20) 10x faster on CPU.
            probs = logits.sub_(row_max).clamp_(min=-80.0).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + total.log()).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if not (want_dx or want_dw):
                continue
            probs.mul_(valid[:, None] / total)  # softmax; ignored rows zeroed
            probs.scatter_add_(1, target, -valid[:, None].to(probs.dtype))  # - onehot(label)
            g = probs if probs.dtype == compute_dtype else buffer[:n].copy_(probs)  # (its logits are spent)
            if want_dx:
                dx[start:start + chunk_rows] = g @ w
            if want_dw:
                if dw is None:
                    dw = (g.t() @ xc).float()
                elif g.dtype == torch.float32:
                    # = dw.addmm_(g.t(), xc), spelled so torch's FlopCounterMode counts it.
                    torch.addmm(dw, g.t(), xc, out=dw)
                else:  # half-precision matmul, fp32 accumulation across chunks
                    dw += (g.t() @ xc).float()
        if want_dw and dw is None:  # no rows at all
            dw = torch.zeros_like(weight, dtype=torch.float32)
        ctx.weight_dtype = weight.dtype
        # Eager: kept on ctx rather than saved, for backward to hand these buffers over (see there).
        # A compiled graph cannot let tensors escape that way, nor return them scaled in place.
        ctx.hand_over = not torch.compiler.is_compiling()
        if ctx.hand_over:
            ctx.grads = (dx, dw)
        else:
            ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.hand_over:
            dx, dw = ctx.saved_tensors
            dx = None if dx is None else dx * grad_loss.to(dx.dtype)
            dw = None if dw is None else (dw * grad_loss).to(ctx.weight_dtype)
            return dx, dw, None, None, None
        # The gradients were computed in forward; scale them in place and hand them over, so
        # that the (V, C) weight gradient (64 MB at a 32k vocabulary and d_model 512) is neither
        # copied here nor, once nothing else holds it, when autograd makes it the .grad.
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice through one forward pass; its gradients are "
                "computed in forward and handed over once (retain_graph=True is not supported here)"
            )
        dx, dw = ctx.grads
        ctx.grads = None
        dx = None if dx is None else dx.mul_(grad_loss.to(dx.dtype))
        dw = None if dw is None else dw.mul_(grad_loss).to(ctx.weight_dtype)
        return dx, dw, None, None, None


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk. CPU: ~16M logits (64 MB fp32), 522 rows at V = 32128, so a chunk's logits stay
    in cache; at the tiny and small benchmark shapes 256-1024 rows are within noise of each other and
    faster than the plain path, 64 rows slower (dW is re-read once per chunk; benchmarks/performance.md). GPU:
    no cache to fit; what counts is that each chunk's three matmuls fill the chip (a few thousand
    rows) while the chunk's logits stay a small slice of memory: ~128M logits (0.5 GB fp32), 4177
    rows at V = 32128, so nanoT5's 128 x 114 decoder rows take 4 chunks instead of 28."""
    logits = 1 << 24 if device.type == "cpu" else 1 << 27
    return max(16, logits // vocab_size)


def linear_cross_entropy(x, weight, labels, reduction: str = "mean", chunk_rows: int | None = None,
                         compute_dtype=None):
    """cross_entropy(x @ weight.T, labels, ignore_index=-100, reduction) without materialising the
    logits. x: (..., C); weight: (V, C); labels: (...); compute_dtype: the matmuls' dtype (default
    x's; pass the autocast dtype under autocast). Always an fp32 loss."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], x.device)
    x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    with torch.autocast(x.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(x2, weight, y, chunk_rows, compute_dtype or x.dtype)
    if reduction == "mean":
        loss = loss / (y != IGNORE_INDEX).sum()
    return loss


class FastTokenNLL(TokenNLL):
    """TokenNLL through linear_cross_entropy while a gradient is wanted; the plain formula otherwise
    (evaluation, scoring). The same summed fp32 NLL over labels != -100."""

    def forward(self, h, weight, labels):  # h: (..., C); weight: (V, C); labels: (...) -> 0-d fp32
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            return super().forward(h, weight, labels)
        return linear_cross_entropy(h, weight, labels, "sum", compute_dtype=compute_dtype(h))
