"""Fresh t5forge weights follow the same per-matrix distributions as transformers' T5 `_init_weights`."""

import torch
from hf_twins import hf_reference

from t5forge.model.config import T5Config
from t5forge.model.hf import hf_to_t5forge_state_dict
from t5forge.model.t5 import T5


def expected_std(name: str, c: T5Config) -> float:
    """Mesh TensorFlow's init, written out per t5forge parameter."""
    if name in ("shared.weight", "lm_head.weight"):
        return 1.0
    if name.endswith("position.weight"):
        return c.d_model**-0.5
    kind = name.split(".")[-2]
    return {
        "q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model**-0.5, "v": c.d_model**-0.5,
        "o": (c.num_heads * c.d_kv) ** -0.5,
        "wi": c.d_model**-0.5, "wi_0": c.d_model**-0.5, "wi_1": c.d_model**-0.5, "wo": c.d_ff**-0.5,
    }[kind]


def test_init_std_per_matrix_matches_hf():
    # d_kv * heads != d_model and d_ff != d_model so that every formula is told apart.
    config = T5Config(vocab_size=512, d_model=128, d_kv=24, num_heads=4, d_ff=320, num_layers=2,
                      num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    ours = T5(config).state_dict()
    hf = hf_to_t5forge_state_dict(hf_reference(config).state_dict(), config)
    assert set(ours) == set(hf)
    for name, tensor in ours.items():
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)) and torch.equal(hf[name], tensor), name
            continue
        want = expected_std(name, config)
        # the relative bias table has only 32 x 4 entries: its sample std is the noisiest
        tol = 0.25 if "position" in name else 0.06
        assert abs(tensor.std().item() / want - 1) < tol, (name, tensor.std().item(), want)
        assert abs(hf[name].std().item() / want - 1) < tol, ("hf", name, hf[name].std().item(), want)
        assert abs(tensor.mean().item()) < 4 * want / tensor.numel() ** 0.5, name


def test_tied_model_has_no_lm_head_and_rescales():
    config = T5Config.from_name("tiny", tie_word_embeddings=True, vocab_size=100)
    model = T5(config).eval()
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    ids = torch.randint(2, 100, (2, 5))
    enc = model.encode(ids)
    x = model.decoder(model.shared(ids), None, enc, None)
    torch.testing.assert_close(model.decode(ids, enc), x @ model.shared.weight.T * 64**-0.5)
