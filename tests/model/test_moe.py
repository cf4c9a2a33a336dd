"""The Switch mixture-of-experts feed-forward (model/moe.py, model.feed_forward=switch): routing
against hand-made router logits (capacity, dropped tokens, top-2 gates), the auxiliary losses
against the paper's formula, gradients reaching every parameter (an expert without tokens
included), the layer placement, the FLOPs count, cached generation equal to a full recompute, a
pre-training run logging the router's losses, the run config and the export refusing it."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from fast_cases import padded_batch, summed_nll, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.flops import training_flops
from t5forge.model.hf import export_hf
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.moe import SwitchFeedForward, active_parameters, route, router_losses
from t5forge.model.t5 import T5, FeedForward

C, E = 4, 3


def switch(top_k=1, factor=1.0, gated=False, **overrides) -> SwitchFeedForward:
    config = tiny_config(d_model=C, d_ff=6, num_experts=E, expert_top_k=top_k, expert_capacity_factor=factor,
                         feed_forward_proj="gated-gelu" if gated else "relu", feed_forward="switch", **overrides)
    torch.manual_seed(0)
    ff = SwitchFeedForward(config)
    with torch.no_grad():  # the router reads the first E channels: a token's logits are its x[:E] * 10
        ff.router.weight.copy_(10 * torch.eye(E, C))
    return ff


def tokens(logit_rows) -> torch.Tensor:
    """(1, N, C) tokens whose router logits (with `switch`'s router) are the given rows / 10."""
    x = torch.zeros(1, len(logit_rows), C)
    x[0, :, :E] = torch.tensor(logit_rows, dtype=torch.float32)
    x[0, :, E:] = torch.arange(1, len(logit_rows) + 1, dtype=torch.float32)[:, None] / 7  # tell them apart
    return x


def expert(ff: SwitchFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e by T5's dense formula, one token (C,) at a time."""
    if ff.gated:
        return (ff.act(x @ ff.wi_0[e]) * (x @ ff.wi_1[e])) @ ff.wo[e]
    return F.relu(x @ ff.wi[e]) @ ff.wo[e]


@pytest.mark.parametrize("gated", [False, True])
def test_top1_routing_fills_capacity_in_token_order_and_drops_the_rest(gated):
    # 6 tokens, 3 experts, factor 1: capacity ceil(6 / 3) = 2. Five prefer expert 0, one expert 2.
    ff = switch(gated=gated).train()
    rows = [[1, 0, 0], [2, 0, 0], [0, 0, 1], [1.5, 0, 0], [3, 0, 0], [1, 0.5, 0]]
    x = tokens(rows)
    assert ff.capacity(6) == 2
    with torch.no_grad():
        y = ff(x)[0]
    probs = (10 * torch.tensor(rows)).softmax(-1)
    for n, choice in [(0, 0), (1, 0), (2, 2)]:  # the first two of expert 0, and token 2 on expert 2
        want = probs[n, choice] * expert(ff, choice, x[0, n])
        torch.testing.assert_close(y[n], want, rtol=1e-5, atol=1e-6)
    for n in (3, 4, 5):  # over expert 0's capacity: dropped, their output exactly 0 (the residual passes them)
        assert torch.equal(y[n], torch.zeros(C))
    # Evaluation drops nothing: the same tokens all get their expert.
    with torch.no_grad():
        y = ff.eval()(x)[0]
    for n in range(6):
        torch.testing.assert_close(y[n], probs[n].max() * expert(ff, int(probs[n].argmax()), x[0, n]),
                                   rtol=1e-5, atol=1e-6)


def test_route_gives_first_choices_priority_over_second_choices():
    # top-2, 3 experts, capacity 2 (slot = expert * 2 + place; 6 = dropped). First choices: tokens 0, 1, 3
    # want expert 0 (token 3 is third: dropped), token 2 expert 1. Second choices queue behind every
    # first choice: token 0 on expert 1 after token 2, token 2 on expert 0 (full: dropped).
    logits = torch.tensor([[3.0, 1, 0], [3, 0, 1], [1, 3, 0], [3, 0.5, 2]])
    r = route(logits, top_k=2, capacity=2)
    assert r.capacity == 2
    assert r.slot[:4].tolist() == [0, 1, 2, 6]  # first choices, token by token
    assert r.slot[4:].tolist() == [3, 4, 6, 5]  # second choices
    p = logits.softmax(-1)
    top = p.topk(2).values
    want = (top / top.sum(-1, keepdim=True)).t().reshape(-1) * torch.tensor([1, 1, 1, 0, 1, 1, 0, 1.0])
    torch.testing.assert_close(r.gate, want)
    # Without a capacity (evaluation) nothing is dropped: expert 0 gets 4 assignments, so 4 slots each.
    r = route(logits, top_k=2, capacity=None)
    assert r.capacity == 4 and (r.slot < 3 * 4).all() and (r.gate > 0).all()


def test_top2_combines_both_experts_with_renormalised_gates():
    ff = switch(top_k=2, factor=2.0).eval()
    rows = [[1, 0.5, 0], [0, 0.2, 0.3], [0.4, 0, 0.1]]
    x = tokens(rows)
    with torch.no_grad():
        y = ff(x)[0]
    probs = (10 * torch.tensor(rows)).softmax(-1)
    for n in range(3):
        p, e = probs[n].topk(2)
        g = p / p.sum()  # renormalised over the two chosen experts
        want = g[0] * expert(ff, int(e[0]), x[0, n]) + g[1] * expert(ff, int(e[1]), x[0, n])
        torch.testing.assert_close(y[n], want, rtol=1e-5, atol=1e-6)


def test_aux_losses_equal_the_papers_formula_on_a_hand_made_routing():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.0, 3.0], [0.1, 0.2, 0.0]])
    balance, z = router_losses(logits)
    N = len(logits)
    p = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits.tolist()]
    choice = [row.index(max(row)) for row in p]  # experts 0, 0, 2, 1
    f = [sum(c == e for c in choice) / N for e in range(E)]  # fraction of tokens dispatched to e
    P = [sum(row[e] for row in p) / N for e in range(E)]  # mean router probability of e
    assert float(balance) == pytest.approx(E * sum(fe * Pe for fe, Pe in zip(f, P)), rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert float(z) == pytest.approx(sum(v * v for v in lse) / N, rel=1e-6)
    # The module reports them through the channel, with the configured weights.
    ff = switch(router_aux_loss_coef=0.25, router_z_loss_coef=0.5)
    ff(tokens(logits.div(10).tolist()))
    assert ff.aux_losses["router_balance"].weight == 0.25 and ff.aux_losses["router_z"].weight == 0.5
    assert float(ff.aux_losses["router_balance"].term.detach()) == pytest.approx(float(balance), rel=1e-5)
    assert float(ff.aux_losses["router_z"].term.detach()) == pytest.approx(float(z), rel=1e-5)
    # A perfectly uniform router has balance 1, the loss's minimum.
    assert float(router_losses(torch.zeros(6, E))[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("gated", [False, True])
def test_every_parameter_gets_a_gradient_when_an_expert_has_no_tokens(gated):
    ff = switch(gated=gated).train()
    x = tokens([[1, 0, 0], [0, 1, 0], [2, 0, 0], [0, 3, 0]]).requires_grad_()  # nobody chooses expert 2
    y = ff(x)
    loss = y.square().sum() + sum(a.weight * a.term for a in ff.aux_losses.values())
    loss.backward()
    for name, p in ff.named_parameters():
        assert p.grad is not None, name
    wo = ff.wo.grad
    assert wo[2].abs().max() == 0 and wo[0].abs().max() > 0 and wo[1].abs().max() > 0
    assert ff.router.weight.grad.abs().max() > 0 and x.grad.abs().max() > 0


def test_a_t5_with_switch_layers_gets_every_gradient_and_places_them_every_kth_layer():
    config = tiny_config(feed_forward="switch", num_experts=4, num_layers=4, num_decoder_layers=3)
    torch.manual_seed(0)
    model = T5(config)
    enc = [type(b.ff) for b in model.encoder.blocks]
    dec = [type(b.ff) for b in model.decoder.blocks]
    assert enc == [FeedForward, SwitchFeedForward, FeedForward, SwitchFeedForward]  # moe_every=2: layers 1, 3
    assert dec == [FeedForward, SwitchFeedForward, FeedForward]
    every = T5(config.replace(moe_every=1))
    assert all(isinstance(b.ff, SwitchFeedForward) for s in (every.encoder, every.decoder) for b in s.blocks)
    # A dense config builds exactly T5's dense blocks whatever the expert fields say.
    dense = T5(tiny_config(num_experts=2, moe_every=1))
    assert all(type(b.ff) is FeedForward for b in dense.decoder.blocks)

    batch = padded_batch()
    out = model(**batch)
    assert set(out.aux_losses) == {"router_balance", "router_z"}
    loss = TokenNLL()(*model.output_projection(out.hidden), batch["labels"])
    (loss + sum(a.weight * a.term for a in out.aux_losses.values())).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert summed_nll(model, TokenNLL(), batch).isfinite()


def test_init_follows_t5s_feed_forward():
    config = tiny_config(feed_forward="switch", num_experts=8, d_model=64, d_ff=256, moe_every=1)
    torch.manual_seed(0)
    ff = T5(config).encoder.blocks[0].ff
    assert ff.wi_0.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert ff.wi_1.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert ff.wo.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert ff.router.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)


def test_flops_count_the_router_and_every_capacity_slot():
    S, T, factor = 10, 6, 1.5
    dense = tiny_config(feed_forward_proj="relu")
    sparse = dense.replace(feed_forward="switch", num_experts=4, expert_capacity_factor=factor)
    C_, Fd = dense.d_model, dense.d_ff
    extra = 0
    # moe_every=2: encoder layer 1 (of 2) and decoder layer 1 (of 3) are sparse
    for n in (S, T):
        cap = math.ceil(factor * n / 4)
        extra += 6 * ((4 * cap - n) * 2 * C_ * Fd + n * C_ * 4)  # expert slots beyond the dense rows; router
    assert training_flops(sparse, 1, S, T) - training_flops(dense, 1, S, T) == extra


def test_cached_generation_equals_a_full_recompute():
    torch.manual_seed(0)
    config = tiny_config(feed_forward="switch", num_experts=4, expert_top_k=2, moe_every=1)
    model = T5(config).eval()
    generated, want, ids, mask = cached_and_recomputed(model)
    assert torch.equal(generated, want)
    assert generated.size(1) > 1


def test_config_checks_and_old_files_load():
    for bad, match in [(dict(expert_top_k=3), "expert_top_k must be 1 or 2"),
                       (dict(num_experts=1, expert_top_k=2), "at most num_experts"),
                       (dict(expert_capacity_factor=0.0), "expert_capacity_factor must be > 0"),
                       (dict(moe_every=0), "moe_every must be a positive integer"),
                       (dict(router_z_loss_coef=-1.0), "router_z_loss_coef must be >= 0"),
                       (dict(feed_forward="switch", moe_every=4), "moe_every=4 leaves no sparse layer")]:
        with pytest.raises(T5ForgeError, match=match):
            tiny_config(**bad)
    saved = tiny_config().to_json_dict()
    for key in ("num_experts", "expert_top_k", "expert_capacity_factor", "moe_every", "router_aux_loss_coef",
                "router_z_loss_coef"):
        saved.pop(key)  # a model_config.json written before these fields
    assert T5Config.from_json_dict(saved) == tiny_config()
    with pytest.raises(T5ForgeError, match=r"model.expert_top_k=3: must be 1 or 2"):
        load_config(["task=pt_tiny", "model.expert_top_k=3"])
    with pytest.raises(T5ForgeError, match=r"model.expert_capacity_factor=0.0: must be > 0"):
        load_config(["task=pt_tiny", "model.expert_capacity_factor=0.0"])


def test_export_refuses_it(tmp_path):
    refusal = r"cannot export to HF T5: model\.feed_forward='switch' has no HF T5 equivalent"
    with pytest.raises(T5ForgeError, match=refusal):
        export_hf(T5(tiny_config(feed_forward="switch")), None, tmp_path / "hf")
    with pytest.raises(T5ForgeError, match=r"model\.num_experts=4 has no HF T5 equivalent"):
        export_hf(T5(tiny_config(num_experts=4)), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_pretrain_run_with_switch_trains_logs_the_router_losses_and_loads_back(tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.feed_forward=switch", "model.num_experts=4")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6
    assert all(r["aux_router_balance"] > 0 and r["aux_router_z"] > 0 for r in train)
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["feed_forward"] == "switch" and saved["num_experts"] == 4
    model, _ = load_model(out)
    assert isinstance(model.decoder.blocks[1].ff, SwitchFeedForward) and model.decoder.blocks[1].ff.num_experts == 4


def test_active_parameters_count_top_k_of_the_experts():
    config = tiny_config(feed_forward="switch", num_experts=4, expert_top_k=2)
    model = T5(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    experts = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[2] in ("wi_0", "wi_1", "wo"))
    assert experts == 2 * 3 * 4 * config.d_model * config.d_ff  # two sparse layers (encoder 1, decoder 1)
    assert active_parameters(shapes, config) == model.num_parameters() - experts // 2
    dense = T5(tiny_config())
    assert active_parameters({k: tuple(v.shape) for k, v in dense.state_dict().items()}, dense.config) \
        == dense.num_parameters()


def test_the_router_stays_fp32_under_autocast():
    ff = switch(top_k=2).train()
    x = tokens([[1, 0, 0], [0, 1, 0.5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ff(x)
    assert ff.aux_losses["router_z"].term.dtype == torch.float32 and y.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(y.float(), ff(x), rtol=0.05, atol=0.02)  # the experts ran in bfloat16
