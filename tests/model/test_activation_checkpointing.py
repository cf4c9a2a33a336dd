"""Activation checkpointing per block (model/activation_checkpointing.py): the recompute happens, and
it changes nothing a run can see -- losses and gradients bit-identical with dropout on (CPU, fp32),
router losses, parameter names, state dict, no-grad passes and generation."""

import copy

import pytest
import torch
from fast_cases import padded_batch, tiny_config

from t5forge import config as run_config
from t5forge.model import activation_checkpointing as ac
from t5forge.model import fast
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5, Attention
from t5forge.optim.build import param_groups

MODES = ("full", "selective")


def build(mode, twins=False, **overrides):
    """A tiny T5 with dropout (seed 0), the twins swapped in or not, then checkpointed by `mode`."""
    torch.manual_seed(0)
    model = T5(tiny_config(dropout_rate=0.2, **overrides)).train()
    loss = TokenNLL()
    if twins:
        model, loss, _ = fast.apply(model, loss, device="cpu")
    ac.apply(model, mode)
    return model, loss


def step(model, loss, batch, seed=7):
    """One forward and backward (dropout drawn from `seed`): (loss, aux terms, gradients by name)."""
    torch.manual_seed(seed)
    out = model(**batch)
    total = loss(*model.output_projection(out.hidden), batch["labels"])
    total = total + sum(aux.term * aux.weight for aux in out.aux_losses.values())
    total.backward()
    aux = {name: a.term.detach() for name, a in out.aux_losses.items()}
    return total.detach(), aux, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("twins", [False, True], ids=["plain", "twins"])
@pytest.mark.parametrize("overrides", [{}, {"feed_forward": "switch", "moe_every": 1},
                                       {"encoder": "hourglass", "num_layers": 4}, {"block": "primer"},
                                       {"position": "rope"}, {"position": "t5_bias_per_layer"}],
                         ids=["dense", "switch", "hourglass", "primer", "rope", "per_layer_bias"])
@pytest.mark.parametrize("mode", MODES)
def test_losses_and_gradients_are_bit_identical_with_dropout(mode, overrides, twins):
    batch = padded_batch()
    ref_loss, ref_aux, ref_grads = step(*build("none", twins, **overrides), batch)
    loss, aux, grads = step(*build(mode, twins, **overrides), batch)
    assert torch.equal(loss, ref_loss)
    assert aux.keys() == ref_aux.keys() and all(torch.equal(aux[k], ref_aux[k]) for k in aux)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    # dropout is on: another seed gives another loss, so the equality above is the RNG replayed
    assert not torch.equal(step(*build(mode, twins, **overrides), batch, seed=8)[0], loss)


@pytest.mark.parametrize("mode,recomputed", [("none", set()), ("full", {0, 1}), ("selective", {0})])
def test_the_chosen_blocks_run_their_forward_again_in_the_backward(mode, recomputed):
    model, loss = build(mode)
    calls = {}
    for i, block in enumerate(model.encoder.blocks):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    step(model, loss, padded_batch())
    assert {i for i, n in calls.items() if n == 2} == recomputed
    assert {i for i, n in calls.items() if n == 1} == {0, 1} - recomputed
    assert ac.checkpointed_blocks(5, "selective") == [0, 2, 4] and ac.checkpointed_blocks(3, "full") == [0, 1, 2]


def test_names_state_dict_and_optimizer_groups_are_unchanged():
    plain, _ = build("none")
    model, _ = build("full", twins=True)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    groups = lambda m: [[id(p) for p in g["params"]] for g in param_groups(m, 0.01)]  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {id(p): n for n, p in plain.named_parameters()}
    assert [[names[i] for i in g] for g in groups(model)] == [[plain_names[i] for i in g] for g in groups(plain)]
    fresh = T5(plain.config)
    fresh.load_state_dict(model.state_dict())  # strict: a checkpointed model's weights load into a plain one
    assert isinstance(model.decoder.blocks[0], type(plain.decoder.blocks[0]))
    assert ac.enabled_in(model) and not ac.enabled_in(plain)


def test_the_recompute_leaves_no_router_losses_behind():
    model, loss = build("full", feed_forward="switch", moe_every=1)
    step(model, loss, padded_batch())
    # T5.forward collected the first forward's terms; the recompute's were dropped, not left for the next one
    assert not [n for n, m in model.named_modules() if m.__dict__.get("aux_losses")]


def test_no_grad_passes_and_generation_run_the_blocks_once_and_equal_the_plain_model():
    plain, _ = build("none")
    model, _ = build("full", twins=True)
    plain.eval(), model.eval()
    batch = padded_batch()
    calls = []
    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out, ref = model(**batch).hidden, plain(**batch).hidden
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n_attention = sum(isinstance(m, Attention) for m in model.modules())
    assert len(calls) == n_attention
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5), plain.generate(ids, mask, max_new_tokens=5))


def test_a_deep_copy_keeps_the_checkpointing_and_applying_twice_changes_nothing():
    model, _ = build("full")
    ac.apply(model, "full")
    twice = type(model.encoder.blocks[0])
    assert twice.__mro__.count(ac.CheckpointedBlock) == 1
    assert type(copy.deepcopy(model).encoder.blocks[0]) is twice


def test_the_run_config_key_and_its_modes_agree():
    assert run_config.ACTIVATION_CHECKPOINTING == ac.MODES
    with pytest.raises(ValueError, match="one of none, full, selective"):
        ac.apply(T5(tiny_config()), "every")


def test_the_run_config_turns_it_on_in_the_training_model(caplog):
    import logging

    from t5forge.config_files import load_config
    from t5forge.distributed import World
    from t5forge.errors import T5ForgeError
    from t5forge.train.setup import training_model

    model = T5(tiny_config())
    cfg = load_config(["model.name=tiny", "model.activation_checkpointing=selective", "model.compile_elementwise=false"])
    with caplog.at_level(logging.INFO, logger="t5forge.model.activation_checkpointing"):
        trained, _ = training_model(model, cfg, World(), torch.device("cpu"))
    assert trained is model and ac.enabled_in(model)
    assert [isinstance(b, ac.CheckpointedBlock) for b in model.decoder.blocks] == [True, False, True]
    assert "activation checkpointing selective: encoder blocks 0; decoder blocks 0, 2" in caplog.text
    assert not ac.enabled_in(training_model(T5(tiny_config()), load_config(["model.name=tiny"]), World(),
                                            torch.device("cpu"))[0])
    with pytest.raises(T5ForgeError, match="model.activation_checkpointing"):
        load_config(["model.activation_checkpointing=yes"])
