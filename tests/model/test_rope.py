"""RoPE, the position component "rope" (model/positions.py): the rotation against the paper's
pairwise 2x2 rotations, scores depending only on the distance, fp32 inside a half model, gradients
(a gradient check of the rotated attention), cached generation equal to a full recompute for the
plain, primer and normformer blocks, the speed twins equal to the plain model, the config's checks,
export refusing it, and a `t5forge pretrain` run with model.position=rope that loads back.
(What every scheme shares, RoPE included: test_positions.py.)"""

import copy
import json
import math

import pytest
import torch
from fast_cases import TOL, assert_converted_equals_plain, padded_batch, plain_and_converted, tiny_config
from recompute import cached_and_recomputed

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast.attention import FastAttention
from t5forge.model.generation import KVCache
from t5forge.model.hf import export_hf
from t5forge.model.load import load_model
from t5forge.model.loss import TokenNLL
from t5forge.model.positions import RoPE
from t5forge.model.t5 import T5, Attention
from t5forge.plan import resolve_model_config


def rope(d_kv=8, theta=10000.0, is_decoder=False) -> RoPE:
    return RoPE(tiny_config(position="rope", d_kv=d_kv, rope_theta=theta), is_decoder)


def by_the_formula(x, offset, theta):
    """x (B, H, L, D) rotated pair by pair: pair i is (x_i, x_{i+D/2}) (the half split), turned at
    position m by the angle m * theta^(-2i/D) with the 2x2 matrix [[cos, -sin], [sin, cos]]."""
    B, H, L, D = x.shape
    out = torch.empty_like(x)
    for m in range(L):
        for i in range(D // 2):
            a = (offset + m) * theta ** (-2 * i / D)
            turn = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=x.dtype)
            pair = torch.stack([x[:, :, m, i], x[:, :, m, i + D // 2]], -1)  # (B, H, 2)
            turned = pair @ turn.T
            out[:, :, m, i], out[:, :, m, i + D // 2] = turned[..., 0], turned[..., 1]
    return out


@pytest.mark.parametrize("offset, theta", [(0, 10000.0), (5, 10000.0), (3, 100.0)])
def test_the_rotation_is_the_papers_pairwise_rotation(offset, theta):
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    got = rope(theta=theta).rotation(6, offset)(x)
    torch.testing.assert_close(got, by_the_formula(x, offset, theta), rtol=1e-5, atol=1e-5)
    assert torch.equal(rope().rotation(6, 0)(x)[:, :, 0], x[:, :, 0])  # position 0: no turn
    # a decoding step's rotation is the full sequence's at that position, exactly
    assert torch.equal(rope().rotation(1, 4)(x[:, :, 4:5]), rope().rotation(6, 0)(x)[:, :, 4:5])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), **TOL)  # a rotation keeps lengths


def test_scores_depend_only_on_the_distance():
    # q at m, k at n: (R_m q) . (R_n k) = q . R_{n-m} k, so shifting both positions changes nothing.
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    scores = {}
    for shift in (0, 7, 300):
        turn = rope(d_kv=16).rotation(5, shift)
        scores[shift] = turn(q) @ turn(k).transpose(-1, -2)
    torch.testing.assert_close(scores[7], scores[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[300], scores[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores[0], q @ k.transpose(-1, -2), atol=1e-2)  # and it does change them


def test_the_rotation_runs_in_fp32_and_returns_the_input_dtype():
    x = torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(2))
    turn = rope().rotation(9, 0)
    assert turn.cos.dtype == torch.float32
    half = turn(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, turn(x.bfloat16().float()).bfloat16(), rtol=0, atol=0)
    model = T5(tiny_config(position="rope")).to(torch.bfloat16)
    assert model.encoder.rotation(4).cos.dtype == torch.float32
    assert model.encode(padded_batch()["input_ids"]).dtype == torch.bfloat16
    assert not any(".position." in name for name in model.state_dict())  # nothing saved


def test_gradients_of_the_rotated_attention_match_finite_differences():
    torch.manual_seed(0)
    cfg = tiny_config(position="rope", d_model=8, num_heads=2, d_kv=4)
    attn = Attention(cfg).double()
    turn = rope(d_kv=4).rotation(5, 2)
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def f(x, wq, wk):  # the attention's output as a function of its input and its q / k weights
        return torch.func.functional_call(attn, {"q.weight": wq, "k.weight": wk}, (x, None), {"rotation": turn})

    inputs = [t.detach().clone().requires_grad_() for t in (x, attn.q.weight, attn.k.weight)]
    assert torch.autograd.gradcheck(f, inputs)


def decode_steps(model, ids, mask, dec):
    """The decoder's logits on `dec`: all at once, one token a step with the cache, and a 3-token
    prefix then single tokens with the cache."""
    with torch.no_grad():
        enc = model.encode(ids, mask)
        full = model.decode(dec, enc, mask)
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        steps = torch.cat([model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(dec.shape[1])], 1)
        cache = KVCache(model.config.num_decoder_layers, dec.shape[1])
        chunks = [model.decode(dec[:, :3], enc, mask, cache=cache)]
        chunks += [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(3, dec.shape[1])]
    return full, steps, torch.cat(chunks, 1)


@pytest.mark.parametrize("block", ["pre_norm", "primer", "normformer"])
def test_cached_generation_equals_a_full_recompute(block):
    torch.manual_seed(0)
    model = T5(tiny_config(position="rope", block=block)).eval()
    if block == "primer":  # off the identity init, so the convolution matters
        for name, p in model.named_parameters():
            if name.endswith("_dconv"):
                p.data = torch.randn_like(p) * 0.5
    generated, want, ids, mask = cached_and_recomputed(model)
    assert want.shape[1] == 8
    assert torch.equal(generated, want)
    dec = torch.randint(2, 96, (3, 6))
    full, steps, chunks = decode_steps(model, ids, mask, dec)
    torch.testing.assert_close(steps, full, **TOL)
    torch.testing.assert_close(chunks, full, **TOL)
    assert model.generate(ids, mask, max_new_tokens=5, num_beams=3).shape[0] == 3  # beams reorder rotated keys
    unturned = T5(tiny_config(position="none", block=block)).eval()  # the same weights, no rotation
    unturned.load_state_dict(model.state_dict())
    assert not torch.allclose(decode_steps(unturned, ids, mask, dec)[0], full, atol=1e-3)


def test_the_attention_twin_applies_the_rotation_as_the_plain_attention():
    torch.manual_seed(0)
    cfg = tiny_config(position="rope")
    plain = Attention(cfg)
    twin = copy.deepcopy(plain)
    twin.__class__ = FastAttention
    turn = rope(d_kv=16).rotation(7, 3)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(twin(x, None, rotation=turn), plain(x, None, rotation=turn), **TOL)
    for a, b in zip(twin.project_kv(x, turn), plain.project_kv(x, turn)):  # what the cache stores
        torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(twin(x, None, rotation=turn), twin(x, None), atol=1e-3)


def test_the_converter_reports_nothing_left_plain_for_rope():
    # the rotation runs inside FastAttention: RoPE needs no twin of its own
    model = T5(tiny_config(position="rope"))
    attentions = sum(isinstance(m, Attention) for m in model.modules())
    _, _, report = fast.apply(model, TokenNLL(), device="cpu")
    assert not report.left_plain and report.swapped["Attention"] == attentions


@pytest.mark.parametrize("elementwise", [False, True])
def test_the_converted_model_equals_the_plain_one_and_generates_the_same(elementwise):
    plain, model, loss = plain_and_converted(tiny_config(position="rope"), elementwise=elementwise)
    assert all(type(a) is FastAttention for b in model.decoder.blocks for a in (b.attn, b.cross_attn))
    assert model.decoder.fused_residual and not model.decoder.bias_forms  # no bias table: the dense form
    assert_converted_equals_plain(model, loss, plain)
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain.eval(), model.eval()
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8), plain.generate(ids, mask, max_new_tokens=8))
    full, steps, _ = decode_steps(model, ids, mask, torch.randint(2, 96, (3, 6)))
    torch.testing.assert_close(steps, full, **TOL)


def test_the_theta_changes_what_the_model_computes():
    outs = []
    for theta in (10000.0, 50.0):
        torch.manual_seed(0)
        outs.append(T5(tiny_config(position="rope", rope_theta=theta))(**padded_batch()).hidden)
    assert not torch.allclose(outs[0], outs[1])


def test_the_config_refuses_an_odd_d_kv_and_a_bad_theta():
    with pytest.raises(T5ForgeError, match="position 'rope' rotates pairs of d_kv features, so d_kv must be even"):
        T5Config(position="rope", d_kv=15)
    T5Config(d_kv=15)  # another scheme has no pairs to make
    for theta in (0.0, -1.0, float("nan")):
        with pytest.raises(T5ForgeError, match="rope_theta .* must be a number > 0"):
            T5Config(position="rope", rope_theta=theta)
    with pytest.raises(T5ForgeError, match="model.d_kv to an even number"):
        resolve_model_config(load_config(["task=pt_tiny", "model.position=rope", "model.d_kv=7"]))


def test_export_refuses_rope(tmp_path):
    with pytest.raises(T5ForgeError, match=r"cannot export to HF T5: model\.position='rope' has no HF T5 equiv"):
        export_hf(T5(tiny_config(position="rope")), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_list_keys_shows_rope_and_its_theta(capsys):
    assert main(["pretrain", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "rope = rotary position embeddings" in out and "RoFormer" in out
    assert "model.rope_theta" in out


def test_a_pretrain_run_with_rope_trains_and_loads_back(tmp_path, tiny_pretrain_args):
    out = tmp_path / "run"
    assert main(tiny_pretrain_args(out, "model.position=rope", "model.rope_theta=500")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/model_config.json")).read_text())
    assert saved["position"] == "rope" and saved["rope_theta"] == 500.0
    model, _ = load_model(out)
    assert type(model.encoder.position) is RoPE and model.decoder.position.theta == 500.0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
