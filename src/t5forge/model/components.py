"""The model's components by name, one registry per kind; `T5Config` names one of each.

    kind          T5Config field   default      HF's T5
    feed-forward  feed_forward     "dense"      yes
    position      position         "t5_bias"    yes
    block         block            "pre_norm"   yes
    encoder       encoder          "stack"      yes

A component is a class built as `Class(config)` (feed-forward) or `Class(config, is_decoder)`
(position, block, encoder). Adding one is the class plus one line in its registry below; see
docs/architecture.md for the contract each kind keeps and a worked example.
"""

from __future__ import annotations

from t5forge.errors import T5ForgeError
from t5forge.model.feed_forwards import SquaredReLUFeedForward
from t5forge.model.t5 import FeedForward, PreNormBlock, Stack, T5RelativeBias

FEED_FORWARDS = {"dense": FeedForward, "squared_relu": SquaredReLUFeedForward}
POSITIONS = {"t5_bias": T5RelativeBias}
BLOCKS = {"pre_norm": PreNormBlock}
ENCODERS = {"stack": Stack}

REGISTRIES = {"feed_forward": FEED_FORWARDS, "position": POSITIONS, "block": BLOCKS, "encoder": ENCODERS}
# What transformers' T5 can express, kind by kind (model/hf.py refuses to export anything else).
HF_T5 = {"feed_forward": "dense", "position": "t5_bias", "block": "pre_norm", "encoder": "stack"}


def component(kind: str, name: str):
    """The class registered as `name` for `kind`, or a T5ForgeError listing the known names."""
    registry = REGISTRIES[kind]
    if name not in registry:
        raise T5ForgeError(f"model.{kind} {name!r} is unknown; known: {', '.join(sorted(registry))}")
    return registry[name]
