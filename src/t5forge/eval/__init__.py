"""Evaluation: held-out loss, generation metrics (Rouge-L, exact match)."""
