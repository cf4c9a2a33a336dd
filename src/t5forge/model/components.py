"""The model's components by name, one registry per kind; `T5Config` names one of each.

    kind          T5Config field   default      HF's T5
    feed-forward  feed_forward     "dense"      yes
    position      position         "t5_bias"    yes (t5_bias_per_layer: UMT5's; alibi, rope, none: no)
    block         block            "pre_norm"   yes
    encoder       encoder          "stack"      yes (hourglass: no)

A component is a class built as `Class(config)` (feed-forward) or `Class(config, is_decoder)`
(position, block, encoder). Adding one is the class plus one line in its registry below; see
docs/architecture.md for the contract each kind keeps and a worked example.

Entries are "module:Class" paths, imported when a model is built: model/t5.py builds through this
module, and its components subclass t5.py's classes, so naming them here keeps the imports one-way.
"""

from __future__ import annotations

import importlib

from t5forge.errors import T5ForgeError

FEED_FORWARDS = {
    "dense": "t5forge.model.t5:FeedForward",
    "squared_relu": "t5forge.model.feed_forwards:SquaredReLUFeedForward",
    "switch": "t5forge.model.moe:SwitchFeedForward",
}
POSITIONS = {
    "t5_bias": "t5forge.model.t5:T5RelativeBias",
    "t5_bias_per_layer": "t5forge.model.per_layer_bias:PerLayerRelativeBias",
    "alibi": "t5forge.model.positions:ALiBi",
    "rope": "t5forge.model.positions:RoPE",
    "none": "t5forge.model.positions:NoPosition",
}
BLOCKS = {
    "pre_norm": "t5forge.model.t5:PreNormBlock",
    "normformer": "t5forge.model.normformer:NormFormerBlock",
    "primer": "t5forge.model.primer:PrimerBlock",
}
ENCODERS = {
    "stack": "t5forge.model.t5:Stack",
    "hourglass": "t5forge.model.hourglass:HourglassStack",
}

REGISTRIES = {"feed_forward": FEED_FORWARDS, "position": POSITIONS, "block": BLOCKS, "encoder": ENCODERS}
# What transformers' T5 (and MT5) can express, kind by kind (model/hf.py refuses to export anything else);
# UMT5 is T5 with a relative-bias table in every layer.
HF_T5 = {"feed_forward": "dense", "position": "t5_bias", "block": "pre_norm", "encoder": "stack"}
HF_UMT5 = {**HF_T5, "position": "t5_bias_per_layer"}
# The components of each checkpoint family (T5Config.model_type).
HF_COMPONENTS = {"t5": HF_T5, "mt5": HF_T5, "umt5": HF_UMT5}


def name_problem(kind: str, name: str) -> str | None:
    """What is wrong with `name` for `kind` (it is not registered; the known names), or None."""
    registry = REGISTRIES[kind]
    return None if name in registry else f"is unknown; known: {', '.join(sorted(registry))}"


def check_name(kind: str, name: str) -> None:
    """A T5ForgeError naming the key and the known names when `name` is not registered for `kind`."""
    problem = name_problem(kind, name)
    if problem:
        raise T5ForgeError(f"model.{kind} {name!r} {problem}")


def component(kind: str, name: str) -> type:
    """The class registered as `name` for `kind` (a class may also be registered directly, e.g. by a test)."""
    check_name(kind, name)
    entry = REGISTRIES[kind][name]
    if not isinstance(entry, str):
        return entry
    module, _, cls = entry.partition(":")
    return getattr(importlib.import_module(module), cls)
