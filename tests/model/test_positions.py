"""The position schemes beside T5's learned buckets (model/positions.py): ALiBi against its formula,
gradients through a tiny T5 with each scheme (ALiBi, RoPE, none), cached generation equal to a full
recompute, packed rows equal to their examples alone, the speed twins' converter equal to the plain
model, the run config choosing them, export refusing them. RoPE's own tests: test_rope.py."""

import json

import pytest
import torch
from fast_cases import assert_converted_equals_plain, padded_batch, plain_and_converted, summed_nll, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.model.fast.stack import FastStack
from t5forge.model.hf import export_hf
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.positions import ALiBi, NoPosition, RoPE, alibi_slopes
from t5forge.model.t5 import T5

SCHEMES = {"alibi": ALiBi, "rope": RoPE, "none": NoPosition}


def formula(slopes, q_len, k_len, offset, causal):
    """bias[h, q, k] by the definition, one entry at a time."""
    out = torch.zeros(1, len(slopes), q_len, k_len)
    for h, m in enumerate(slopes):
        for i in range(q_len):
            q = i + offset
            for k in range(k_len):
                out[0, h, i, k] = -m * (max(q - k, 0) if causal else abs(k - q))
    return out


def test_alibi_slopes_are_the_papers():
    # H a power of two: 2^(-8 (h+1) / H); H = 6: the 4-head slopes, then every other 8-head slope.
    assert alibi_slopes(4) == [2**-2, 2**-4, 2**-6, 2**-8]
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    assert alibi_slopes(12) == [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]


@pytest.mark.parametrize("heads", [4, 6])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_alibi_bias_is_its_formula(heads, is_decoder):
    alibi = ALiBi(tiny_config(num_heads=heads), is_decoder)
    slopes = alibi_slopes(heads)
    got = alibi(5, 7)
    assert got.shape == (1, heads, 5, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got, formula(slopes, 5, 7, 0, is_decoder), rtol=0, atol=0)
    if not is_decoder:
        torch.testing.assert_close(alibi(6, 6), alibi(6, 6).transpose(-1, -2), rtol=0, atol=0)  # symmetric
    else:  # decoding: one query at position `offset` over the keys so far
        torch.testing.assert_close(alibi(1, 4, offset=3), formula(slopes, 1, 4, 3, True), rtol=0, atol=0)
        torch.testing.assert_close(alibi(1, 4, offset=3), alibi(4, 4)[:, :, 3:], rtol=0, atol=0)


def test_alibi_keeps_its_slopes_exact_in_a_half_model_and_saves_nothing():
    model = T5(tiny_config(position="alibi", num_heads=12, d_kv=4)).to(torch.bfloat16)
    assert model.encoder.position(3, 3).dtype == torch.float32
    torch.testing.assert_close(model.encoder.position(3, 3), formula(alibi_slopes(12), 3, 3, 0, False),
                               rtol=0, atol=0)
    assert not any(".position." in name for name in model.state_dict())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_model_with_the_scheme_has_t5s_other_parameters_and_initialises(scheme):
    torch.manual_seed(0)
    t5 = T5(tiny_config())
    torch.manual_seed(0)
    model = T5(tiny_config(position=scheme))
    assert type(model.encoder.position) is SCHEMES[scheme] and type(model.decoder.position) is SCHEMES[scheme]
    expected = {n: p.shape for n, p in t5.named_parameters() if ".position." not in n}
    assert {n: p.shape for n, p in model.named_parameters()} == expected
    model.init_weights()  # nothing of its own to initialise, nothing to trip over
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert NoPosition(tiny_config(), True)(3, 3) is None


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_gradients_reach_every_parameter(scheme):
    torch.manual_seed(0)
    model = T5(tiny_config(position=scheme))
    batch = padded_batch()
    summed_nll(model, TokenNLL(), batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_the_schemes_change_what_the_model_computes():
    # The same weights (no position parameters anywhere): only the scheme differs.
    outs = {}
    for scheme in ("alibi", "rope", "none"):
        torch.manual_seed(0)
        outs[scheme] = T5(tiny_config(position=scheme))(**padded_batch()).hidden
    assert not torch.allclose(outs["alibi"], outs["none"])
    assert not torch.allclose(outs["rope"], outs["none"]) and not torch.allclose(outs["rope"], outs["alibi"])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_cached_generation_equals_a_full_recompute(scheme):
    torch.manual_seed(0)
    config = tiny_config(position=scheme)
    model = T5(config).eval()
    generated, want, ids, mask = cached_and_recomputed(model)
    assert torch.equal(generated, want)
    assert generated.size(1) > 1


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_the_converted_model_equals_the_plain_one_on_the_dense_bias(scheme):
    plain, model, loss = plain_and_converted(tiny_config(position=scheme))
    stacks = [model.encoder, model.decoder]
    assert all(type(s) is FastStack and not s.bias_forms for s in stacks)  # the position is not T5's table
    assert all(type(s.position) is SCHEMES[scheme] for s in stacks)
    assert_converted_equals_plain(model, loss, plain)


def test_the_converter_reports_the_scheme_and_the_dense_bias(caplog):
    with caplog.at_level("INFO", logger="t5forge.model.fast"):
        plain_and_converted(tiny_config(position="alibi"))
    line = next(r.getMessage() for r in caplog.records if "speed twins" in r.getMessage())
    assert "ALiBi (no twin) x2" in line and "attention bias forms: none" in line


def test_export_refuses_alibi(tmp_path):
    with pytest.raises(T5ForgeError, match=r"cannot export to HF T5: model\.position='alibi' has no HF T5 equiv"):
        export_hf(T5(tiny_config(position="alibi")), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_run_config_chooses_the_scheme(tmp_path, tiny_pretrain_args):
    with pytest.raises(T5ForgeError, match="model.position='nope': is unknown; known: alibi, none, rope, t5_bias"):
        load_config(["task=pt_tiny", "model.position=nope"])
    assert load_config(["task=pt_tiny", "model.position=none"]).model.position == "none"
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.position=alibi")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["position"] == "alibi"
    model, _ = load_model(out)
    assert type(model.encoder.position) is ALiBi and type(model.decoder.position) is ALiBi
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_packed_row_computes_each_example_as_alone(scheme):
    # Distances are relative and an example is contiguous: packing needs nothing of the scheme.
    plain, model, _ = plain_and_converted(tiny_config(position=scheme))
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randint(2, 96, (n,), generator=g) for n in (5, 3)]
    labels = [torch.randint(2, 96, (n,), generator=g) for n in (4, 2)]
    packed = {
        "input_ids": torch.cat([*inputs, torch.zeros(1, dtype=torch.long)])[None],
        "encoder_segment_ids": torch.tensor([[1] * 5 + [2] * 3 + [0]]),
        "labels": torch.cat([*labels, torch.tensor([-100])])[None],
        "decoder_segment_ids": torch.tensor([[1] * 4 + [2] * 2 + [0]]),
    }
    with torch.no_grad():
        alone = torch.cat([plain(input_ids=i[None], labels=lab[None]).hidden[0] for i, lab in zip(inputs, labels)])
        for m in (plain, model):
            torch.testing.assert_close(m(**packed).hidden[0, :6], alone, rtol=1e-5, atol=1e-5)


def test_no_position_and_no_mask_is_no_bias_at_all():
    plain, model, _ = plain_and_converted(tiny_config(position="none"))
    ids = padded_batch()["input_ids"]
    with torch.no_grad():
        for m in (plain, model):
            assert m.encoder.attention_biases(m.shared(ids), None, None, None, 0, None, None) == (None, None)
            torch.testing.assert_close(m.encode(ids), plain.encode(ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-5)
