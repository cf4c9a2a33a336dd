"""t5forge's T5 vs transformers' T5ForConditionalGeneration with the same random weights: logits,
loss, encoder states, greedy and beam-search tokens, for several architectures, the plain model and
the model with its speed twins swapped in (hf_twins.VARIANTS); plus the HF <-> t5forge name mapping
round trip."""

import pytest
import torch
from hf_twins import (
    HF_NEEDS_NO_CACHE,
    VARIANTS,
    generation_batch,
    hf_reference,
    make_eos_likely,
    pad_after_eos,
    padded_batch,
    t5forge_config,
    twin,
    variant_twin,
)

from t5forge.model.hf import HF_REDUNDANT, hf_to_t5forge_state_dict, t5forge_to_hf_state_dict
from t5forge.model.loss import seq2seq_loss

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_and_encoder_match_hf(config_name, variant):
    config = t5forge_config(config_name)
    hf = hf_reference(config)
    model = variant_twin(hf, config, variant)
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out = model(input_ids, attention_mask, labels=labels)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss, summed = seq2seq_loss(model, **batch), seq2seq_loss(model, "sum", **batch)
    torch.testing.assert_close(out.encoder_hidden_states, ref.encoder_last_hidden_state, **TOL)
    torch.testing.assert_close(model.logits(out.hidden), ref.logits, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    n_tokens = (labels != -100).sum()
    torch.testing.assert_close(summed, ref.loss * n_tokens, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_explicit_decoder_inputs_and_padding_mask_match_hf(variant):
    config = t5forge_config("v1_1-gated-gelu-untied")
    hf = hf_reference(config)
    model = variant_twin(hf, config, variant)
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    decoder_input_ids = model.shift_right(labels)
    decoder_attention_mask = (labels != -100).long()
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                 decoder_attention_mask=decoder_attention_mask)
        out = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask)
    torch.testing.assert_close(model.logits(out.hidden), ref.logits, **TOL)
    assert torch.equal(decoder_input_ids, hf._shift_right(labels))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_matches_hf_token_for_token(config_name, num_beams, variant):
    config = t5forge_config(config_name)
    hf = hf_reference(config)
    use_cache = config_name not in HF_NEEDS_NO_CACHE
    input_ids, attention_mask = generation_batch(config.vocab_size)
    make_eos_likely(hf, config, input_ids, attention_mask, use_cache)
    model = variant_twin(hf, config, variant)
    ref = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=num_beams,
                      max_new_tokens=10, use_cache=use_cache)
    out = model.generate(input_ids, attention_mask, max_new_tokens=10, num_beams=num_beams)
    assert out.dtype == torch.long
    assert torch.equal(out, pad_after_eos(ref)), f"\nhf:\n{ref}\nt5forge:\n{out}"
    if num_beams == 1:  # the setup must exercise both early EOS and the length limit
        ended = (out == config.eos_token_id).any(1)
        assert ended.any() and not ended.all()


def test_generation_infers_mask_from_padding_and_restores_train_mode():
    config = t5forge_config("v1_1-gated-gelu-untied", dropout_rate=0.1)
    hf = hf_reference(config)
    model = twin(hf, config, "eager").train()
    input_ids, attention_mask = generation_batch(config.vocab_size)
    without_mask = model.generate(input_ids, max_new_tokens=6, num_beams=2)
    assert model.training
    assert torch.equal(without_mask, model.generate(input_ids, attention_mask, max_new_tokens=6, num_beams=2))
    assert model.generate(input_ids, max_new_tokens=0).shape == (input_ids.size(0), 0)


def test_state_dict_round_trip_hf_t5forge_hf(config_name):
    config = t5forge_config(config_name)
    hf_sd = hf_reference(config).state_dict()
    ours = hf_to_t5forge_state_dict(hf_sd, config)
    model = twin(hf_reference(config), config)
    assert set(ours) == set(model.state_dict())  # exactly the t5forge parameters, nothing extra
    back = t5forge_to_hf_state_dict(ours)
    tied_aliases = set(HF_REDUNDANT) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert set(back) == set(hf_sd) - tied_aliases
    for name, tensor in back.items():
        assert torch.equal(tensor, hf_sd[name]), name
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert torch.equal(hf_sd[alias], back["shared.weight"])


def test_converted_equals_plain_forward_and_gradients():
    from t5forge.model.fast.loss import FastTokenNLL

    config = t5forge_config("deeper-decoder")
    hf = hf_reference(config)
    plain, converted = twin(hf, config, "sdpa"), twin(hf, config, "sdpa", converted=True)
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    for model, loss in ((plain, None), (converted, FastTokenNLL())):
        model.train()  # dropout_rate is 0: train mode is deterministic but takes the training paths
        seq2seq_loss(model, "sum", loss, input_ids=input_ids, attention_mask=attention_mask, labels=labels).backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in converted.named_parameters():
        # summed loss over ~50 tokens: gradients are O(10), compare relative to each tensor's scale
        scale = grads_plain[name].abs().max()
        assert (p.grad - grads_plain[name]).abs().max() <= 1e-5 * scale, name
    assert plain.encoder.position.weight.grad.abs().sum() > 0  # the bias learns through the mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_forward_close_to_fp32(variant):
    config = t5forge_config("v1_1-gated-gelu-untied")
    hf = hf_reference(config)
    model = variant_twin(hf, config, variant)
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.logits(model(input_ids, attention_mask, labels=labels).hidden)
            loss = seq2seq_loss(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    scale = ref.logits.abs().max()
    assert (logits.float() - ref.logits).abs().max() < 0.03 * scale
    assert abs(loss.item() - ref.loss.item()) < 0.02 * ref.loss.item()


def test_dropout_active_in_train_mode_only():
    config = t5forge_config("v1_0-relu-tied", dropout_rate=0.3)
    model = twin(hf_reference(config), config, "sdpa")
    input_ids, attention_mask, labels = padded_batch(config.vocab_size)
    model.train()
    a = model.logits(model(input_ids, attention_mask, labels=labels).hidden)
    b = model.logits(model(input_ids, attention_mask, labels=labels).hidden)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.logits(model(input_ids, attention_mask, labels=labels).hidden),
                               model.logits(model(input_ids, attention_mask, labels=labels).hidden))
