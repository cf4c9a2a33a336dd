"""The T5 model, its attention back ends, generation and HF checkpoint conversion."""
