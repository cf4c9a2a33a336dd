"""Random number generator state: seed, capture and restore Python, NumPy, torch CPU and CUDA RNGs.

Dropout masks and any host-side sampling depend on these, so a resumed run restores them to
reproduce the uninterrupted run. The captured state holds only tensors, ints, floats and strings,
so `torch.load(..., weights_only=True)` can read it back.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank `rank` from step `step` on: what a run resumed on another number of ranks
    reseeds with (the saved per-rank streams have no counterpart there)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def capture() -> dict:
    """The current state of every RNG the training process uses."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is already in use: capturing must not create a CUDA context on its own.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Put every RNG back to a state returned by `capture`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["bit_generator"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available here; they are not restored")
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        warnings.warn(
            f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this machine has {count}; "
            f"restoring the first {min(count, len(cuda_states))}"
        )
    for index, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), device=index)
