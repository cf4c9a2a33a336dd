"""t5forge: pre-train and fine-tune T5-style encoder-decoder models fast, on the hardware you have."""

__version__ = "0.1.0"

from t5forge.errors import T5ForgeError

__all__ = ["T5ForgeError", "__version__", "load_model"]


def load_model(path, device="cpu", dtype=None):
    """Return `(model, tokenizer)` from an HF T5 directory or a t5forge checkpoint."""
    from t5forge.model.load import load_model as _load

    return _load(path, device=device, dtype=dtype)
