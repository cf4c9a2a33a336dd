"""The Switch Transformer's sparse mixture-of-experts feed-forward (Fedus et al. 2021, "Switch
Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity"), the
feed-forward component "switch" (`model.feed_forward=switch`).

    p = softmax(router(x))                        fp32, one logit per expert
    top-1:  y = p_e(x) * expert_e(x)               e = argmax p (Switch)
    top-2:  y = g_1 * expert_1(x) + g_2 * expert_2(x),  g_i = p_i / (p_1 + p_2)   (renormalised, GShard)

- Each expert is T5's dense feed-forward (`FeedForward`): wo(act(wi x)), or gated
  wo(act(wi_0 x) * wi_1 x), as feed_forward_proj says. Their weights are stacked, (E, d_model, d_ff)
  and (E, d_ff, d_model), and computed in one batched matmul over every expert's slots: no Python
  loop over tokens or experts.
- Capacity (training): each expert has ceil(expert_capacity_factor * tokens * top_k / E) slots
  (at most `tokens`), filled in token order; first choices take slots before any second choice
  (GShard's priority). An assignment beyond its expert's capacity is dropped: its contribution is 0,
  and a token with none left passes through the block's residual unchanged. `tokens` is every
  position of the batch, padding included: the feed-forward sees (B, L, C) and no mask, so padding
  is routed, takes slots and counts in the auxiliary losses.
- Evaluation (`model.eval()`): no token is dropped (each expert gets as many slots as it has
  tokens), so a token's output never depends on the other tokens of the batch: cached generation
  equals a full recompute, and the held-out NLL does not depend on how the batch was composed.
- Auxiliary losses (the model's channel, logged as aux_router_balance and aux_router_z):
  router_balance = E * sum_e f_e * P_e, f_e the fraction of tokens whose first choice is e (before
  dropping) and P_e the mean router probability of e (the paper's eq. 4-6), weighted by
  router_aux_loss_coef; router_z = mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022,
  ST-MoE), weighted by router_z_loss_coef.
- DDP: every expert's weights enter the batched matmul whatever their slots hold, so every
  parameter gets a gradient (zeros for an expert without tokens) in every step.
- FLOPs (model/flops.py counts the matmuls issued): the router (tokens x d_model x E) and the experts
  over all E * capacity slots, empty or not: the active compute, capacity slots included, not
  E times a dense feed-forward.
- Which layers: T5Config.for_layer puts this feed-forward in every moe_every-th layer of each
  stack; the others keep T5's dense one.
- Init (`init_weights`, called by T5.init_weights): as T5's feed-forward, std d_model**-0.5 for the
  router and wi, d_ff**-0.5 for wo.

No speed twin; HF's T5 has no experts, so `t5forge export` refuses model.feed_forward=switch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.model.config import T5Config
from t5forge.model.outputs import AuxLoss
from t5forge.model.t5 import ACTIVATIONS


# The stacked expert weights' attribute names (parameters of their own, not nn.Linear's ".weight").
EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")


def active_parameters(shapes: dict, config: T5Config) -> int:
    """The parameters one token uses, from a state dict's {name: shape}: every parameter, except that
    each sparse layer's stacked experts (E, ., .) count top_k of their num_experts (the router counts
    in full)."""
    total = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if config.feed_forward == "switch" and name.rpartition(".")[2] in EXPERT_WEIGHTS and len(shape) == 3:
            n = n // config.num_experts * config.expert_top_k
        total += n
    return total


class Routing:
    """Where each token's assignments go. N tokens, k = top_k assignments each (choice-major:
    row j * N + n is token n's j-th choice):
      slot (k*N,) long   flat index into the (E * capacity) expert slots; E * capacity = dropped
      gate (k*N,) fp32   its weight in the token's output (0 when dropped)
      capacity int       slots per expert
    """

    def __init__(self, slot, gate, capacity):
        self.slot, self.gate, self.capacity = slot, gate, capacity


def route(logits: torch.Tensor, top_k: int, capacity: int | None) -> Routing:
    """The routing of N tokens from their router logits (N, E) fp32: top-k experts by probability,
    top-2 gates renormalised to sum to 1, slots filled in token order with first choices first;
    capacity None = no token dropped (as many slots as the fullest expert needs)."""
    N, E = logits.shape
    probs = logits.softmax(-1)
    gate, expert = probs.topk(top_k, dim=-1)  # (N, k)
    if top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    onehot = F.one_hot(expert.t().reshape(-1), E)  # (k*N, E), choice-major: first choices first
    position = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # (k*N,) the assignment's place in its expert's queue
    if capacity is None:  # evaluation: every assignment kept
        capacity = int(onehot.sum(0).max())
    keep = position < capacity
    flat_expert = expert.t().reshape(-1)
    slot = torch.where(keep, flat_expert * capacity + position, torch.full_like(position, E * capacity))
    return Routing(slot, gate.t().reshape(-1) * keep, capacity)


def router_losses(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(load balance E * sum_e f_e * P_e, z-loss mean(logsumexp(logits)^2)) of router logits (N, E) fp32;
    f_e: the fraction of tokens whose first choice is e, P_e: e's mean router probability."""
    E = logits.shape[-1]
    probs = logits.softmax(-1)
    f = F.one_hot(probs.argmax(-1), E).float().mean(0)
    balance = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return balance, z


class SwitchFeedForward(nn.Module):
    """"switch": a router and E experts, each T5's dense feed-forward (see the module docstring)."""

    def __init__(self, config: T5Config):
        super().__init__()
        E, C, Fd = config.num_experts, config.d_model, config.d_ff
        self.num_experts, self.top_k = E, config.expert_top_k
        self.capacity_factor = config.expert_capacity_factor
        self.coefs = (config.router_aux_loss_coef, config.router_z_loss_coef)
        self.d_model, self.d_ff = C, Fd
        self.gated, self.activation = config.is_gated, config.activation
        self.act = ACTIVATIONS[config.activation]
        self.router = nn.Linear(C, E, bias=False)
        # Stacked expert weights, laid out for x @ w (not nn.Linear's transposed form).
        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        for name in names:
            setattr(self, name, nn.Parameter(torch.empty(E, C, Fd)))
        self.wo = nn.Parameter(torch.empty(E, Fd, C))
        self.dropout = nn.Dropout(config.dropout_rate)
        self.aux_losses: dict = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.router.weight, std=self.d_model**-0.5)
        for name in ("wi", "wi_0", "wi_1"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=self.d_model**-0.5)
        nn.init.normal_(self.wo, std=self.d_ff**-0.5)

    def capacity(self, tokens: int) -> int:
        """Slots per expert in training: ceil(factor * tokens * top_k / E), at least 1, at most tokens
        (no expert can receive more)."""
        return max(1, min(tokens, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)))

    def experts(self, h: torch.Tensor) -> torch.Tensor:  # (E, S, C) slots -> (E, S, C): every expert at once
        if self.gated:
            u = self.act(torch.bmm(h, self.wi_0.to(h.dtype))) * torch.bmm(h, self.wi_1.to(h.dtype))
        else:
            u = self.act(torch.bmm(h, self.wi.to(h.dtype)))
        return torch.bmm(self.dropout(u), self.wo.to(h.dtype))

    def forward(self, x):  # (B, L, C) -> (B, L, C)
        B, L, C = x.shape
        N, E = B * L, self.num_experts
        tokens = x.reshape(N, C)
        # (N, E) in fp32, the paper's "selective precision": autocast would run the router in half precision
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())
        balance, z = router_losses(logits)
        self.aux_losses = {"router_balance": AuxLoss(balance, self.coefs[0]),
                           "router_z": AuxLoss(z, self.coefs[1])}
        r = route(logits, self.top_k, self.capacity(N) if self.training else None)
        # Dispatch: every assignment's token into its slot; dropped ones into one extra slot, cut off
        # (index_add: each kept slot receives exactly one token, and it is deterministic).
        source = tokens.repeat(self.top_k, 1)  # (k*N, C), choice-major as r.slot
        slots = tokens.new_zeros(E * r.capacity + 1, C).index_add(0, r.slot, source)
        out = self.experts(slots[:-1].view(E, r.capacity, C)).reshape(E * r.capacity, C)
        # Combine: each assignment reads its slot's output (the extra slot is zeros), times its gate.
        out = torch.cat([out, out.new_zeros(1, C)])[r.slot] * r.gate.to(out.dtype)[:, None]  # (k*N, C)
        return out.view(self.top_k, N, C).sum(0).view(B, L, C)
