"""The T5 architecture as a frozen dataclass, with transformers' `T5Config` field names.

Two JSON forms: HF's `config.json` (`from_hf_dict` / `to_hf_dict`: only the keys HF's T5Config
knows, `HF_CONFIG_KEYS`; a model_type other than T5's families, `FAMILIES`, is rejected) and t5forge's own
`model_config.json` (`from_json_dict` / `to_json_dict`: every field, the t5forge-only ones
included). Each value's type is checked against the dataclass field's annotation, so a field added
later (of any JSON type) never breaks loading a file saved before it: a missing key takes the
field's default. `from_name` knows the shapes of the common public checkpoints offline.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from t5forge import run_layout
from t5forge.errors import T5ForgeError
from t5forge.model.components import check_name

ATTENTION_BACKENDS = ("eager", "sdpa", "flex")
# The activations HF's T5 knows ("gated-" prefixed or not). HF maps "gated-gelu" to the tanh
# approximation ("gelu_new") for backwards compatibility; plain "gelu" is the exact erf GELU.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
# The T5Config fields that transformers' T5Config knows (its fields and PreTrainedConfig's
# tie_word_embeddings, plus decoder_start_token_id, which HF's T5 reads from its config); every
# other field is t5forge's alone and never goes into an HF config.json.
HF_CONFIG_KEYS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
    "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id",
    "decoder_start_token_id", "model_type",
)
# The checkpoint families t5forge reads and writes: model_type -> transformers' class. mT5 is T5 v1.1's
# math with a multilingual vocabulary (HF's MT5 never rescales the decoder output: always untied);
# UMT5 gives every layer's self-attention its own relative-bias table (position "t5_bias_per_layer").
FAMILIES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
            "umt5": "UMT5ForConditionalGeneration"}
# Feed-forwards that T5Config.for_layer puts into every moe_every-th layer only.
SPARSE_FEED_FORWARDS = ("switch",)
# What to_hf_dict adds: constant for every model t5forge writes.
HF_CONSTANT_KEYS = {"is_encoder_decoder": True, "initializer_factor": 1.0, "use_cache": True}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int | None = None  # None -> num_layers
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"  # the HF family written on export (FAMILIES): "t5" | "mt5" | "umt5"
    attention_backend: str = "sdpa"  # t5forge only: "eager" | "sdpa" | "flex" (FlexAttention, GPU)
    # t5forge only: the components, by their names in model/components.py (HF's T5 is these defaults)
    feed_forward: str = "dense"
    position: str = "t5_bias"
    block: str = "pre_norm"
    encoder: str = "stack"
    # t5forge only: the hourglass encoder (model/hourglass.py): shortening factor k, and the blocks at
    # full length before and after the shortened ones (num_layers - pre - post run shortened)
    hourglass_factor: int = 2
    hourglass_pre: int = 1
    hourglass_post: int = 1
    # t5forge only: RoPE's base (position="rope", model/positions.py): theta_i = rope_theta^(-2i / d_kv)
    rope_theta: float = 10000.0
    # t5forge only: the sparse mixture-of-experts feed-forward (feed_forward="switch", model/moe.py);
    # read only by it, so they change nothing in a model without it.
    num_experts: int = 8
    expert_top_k: int = 1  # experts per token: 1 (Switch) or 2 (GShard-style top-2)
    expert_capacity_factor: float = 1.25  # slots per expert = ceil(factor * tokens * top_k / num_experts)
    moe_every: int = 2  # every moe_every-th layer of a stack is sparse (layers k-1, 2k-1, ...), the rest dense
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (the paper's alpha)
    router_z_loss_coef: float = 0.001  # router z-loss weight (Zoph et al. 2022, ST-MoE)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise T5ForgeError(f"model config: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise T5ForgeError(f"model config: dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        self.activation  # validates feed_forward_proj
        if self.model_type not in FAMILIES:
            raise T5ForgeError(f"model config: model_type {self.model_type!r} is unknown; use one of {list(FAMILIES)}")
        if self.model_type == "mt5" and self.tie_word_embeddings:
            raise T5ForgeError(
                "model config: model_type 'mt5' has its own lm_head and no output rescale (HF's MT5 has no tied, "
                "rescaled form); set tie_word_embeddings to false, or model_type 't5' for a tied model"
            )
        for name in ("num_experts", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise T5ForgeError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.expert_top_k not in (1, 2) or self.expert_top_k > self.num_experts:
            raise T5ForgeError(
                f"model config: expert_top_k must be 1 or 2 and at most num_experts ({self.num_experts}), "
                f"got {self.expert_top_k!r}"
            )
        if not self.expert_capacity_factor > 0:
            raise T5ForgeError(
                f"model config: expert_capacity_factor must be > 0, got {self.expert_capacity_factor!r}")
        if self.feed_forward in SPARSE_FEED_FORWARDS and self.moe_every > max(self.num_layers, self.num_decoder_layers):
            raise T5ForgeError(
                f"model config: moe_every={self.moe_every} leaves no sparse layer in {self.num_layers} encoder / "
                f"{self.num_decoder_layers} decoder layers (feed_forward={self.feed_forward!r}); lower moe_every"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise T5ForgeError(f"model config: {name} must be >= 0, got {getattr(self, name)!r}")
        for kind in ("feed_forward", "position", "block", "encoder"):
            check_name(kind, getattr(self, kind))
        self._check_hourglass()
        self._check_rope()
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise T5ForgeError(
                f"model config: attention_backend {self.attention_backend!r} is unknown; use one of {ATTENTION_BACKENDS}"
            )

    def _check_rope(self):
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise T5ForgeError(f"model config: rope_theta (RoPE's base) must be a number > 0, got {self.rope_theta!r}")
        if self.position == "rope" and self.d_kv % 2:
            raise T5ForgeError(
                f"model config: position 'rope' rotates pairs of d_kv features, so d_kv must be even, got "
                f"d_kv={self.d_kv}; set model.d_kv to an even number (or another model.position)"
            )

    def _check_hourglass(self):
        k, pre, post = self.hourglass_factor, self.hourglass_pre, self.hourglass_post
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise T5ForgeError(f"model config: hourglass_factor (the shortening factor) must be an integer >= 2, "
                               f"got {k!r}")
        for name, value in (("hourglass_pre", pre), ("hourglass_post", post)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise T5ForgeError(f"model config: {name} must be an integer >= 0, got {value!r}")
        if self.encoder == "hourglass" and self.num_layers - pre - post < 1:
            raise T5ForgeError(
                f"model config: encoder 'hourglass' runs num_layers - hourglass_pre - hourglass_post blocks "
                f"shortened, at least 1: num_layers={self.num_layers}, hourglass_pre={pre}, "
                f"hourglass_post={post}; raise num_layers or lower hourglass_pre / hourglass_post"
            )

    # ------------------------------------------------------------------ derived
    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The activation name of the feed-forward ("relu", "gelu", "gelu_new" or "silu")."""
        proj = self.feed_forward_proj
        act = proj[len("gated-"):] if proj.startswith("gated-") else proj
        if act not in ACTIVATIONS:
            raise T5ForgeError(
                f"model config: feed_forward_proj {proj!r} is unknown; use 'relu', 'gated-gelu', 'gated-silu' "
                f"or another of {list(ACTIVATIONS)} with an optional 'gated-' prefix"
            )
        return "gelu_new" if proj == "gated-gelu" else act

    def for_layer(self, index: int) -> "T5Config":
        """The config that layer `index` (0-based, within its stack) is built from: this one, except
        that with a sparse feed-forward (SPARSE_FEED_FORWARDS) only every moe_every-th layer has it
        (layers moe_every-1, 2*moe_every-1, ...: for 2 the odd layers, Switch Transformer's placement)
        and the others have T5's dense one."""
        if self.feed_forward in SPARSE_FEED_FORWARDS and (index + 1) % self.moe_every:
            return self.replace(feed_forward="dense")
        return self

    def replace(self, **changes) -> "T5Config":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise T5ForgeError(f"model config: unknown field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON in and out
    @classmethod
    def t5forge_only_fields(cls) -> tuple[str, ...]:
        """The fields HF's T5Config does not know (attention_backend, the component names, ...)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in HF_CONFIG_KEYS)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "T5Config":
        """Build from an HF T5 `config.json` dict (its HF keys only); `source` names the file in errors."""
        return cls._from_dict(d, source, HF_CONFIG_KEYS)

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "model_config.json") -> "T5Config":
        """Build from t5forge's `model_config.json` dict: every field it holds, HF's and t5forge's."""
        return cls._from_dict(d, source, tuple(f.name for f in dataclasses.fields(cls)))

    @classmethod
    def _from_dict(cls, d: dict, source: str, keys: tuple[str, ...]) -> "T5Config":
        if not isinstance(d, dict):
            raise T5ForgeError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise T5ForgeError(
                f"{source}: model_type is {model_type!r}, but t5forge loads only T5 models (model_type "
                f"{', '.join(repr(f) for f in FAMILIES)}); point at a T5, mT5 or UMT5 checkpoint"
            )
        kwargs = {key: d[key] for key in keys if key in d}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            if len(eos) != 1:
                raise T5ForgeError(f"{source}: eos_token_id {eos} has several ids; T5 needs a single EOS id")
            kwargs["eos_token_id"] = eos[0]
        for key in ("pad_token_id", "eos_token_id"):
            if key in kwargs and kwargs[key] is None:
                kwargs.pop(key)
        if kwargs.get("decoder_start_token_id") is None:
            kwargs["decoder_start_token_id"] = kwargs.get("pad_token_id", 0)
        if isinstance(d.get("scale_decoder_outputs"), bool):
            # transformers >= 5 always writes tie_word_embeddings=true for T5 and records the v1.0 / v1.1
            # difference here instead: v1.1 (own lm_head) does not rescale the decoder output.
            kwargs["tie_word_embeddings"] = d["scale_decoder_outputs"]
        if model_type == "mt5":
            # HF's MT5 never rescales the decoder output (transformers 5 writes tie_word_embeddings=true
            # for it all the same): an untied model computes its function, lm_head copying shared if absent.
            kwargs["tie_word_embeddings"] = False
        if model_type == "umt5" and "position" not in kwargs:
            kwargs["position"] = "t5_bias_per_layer"  # HF's UMT5: a relative-bias table in every layer
        # HF's default (and the original T5 checkpoints, which omit the key) is tied embeddings.
        kwargs.setdefault("tie_word_embeddings", True)
        # HF's T5Config default; mT5's and UMT5's configs default to gated-gelu
        kwargs.setdefault("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu")
        hints = typing.get_type_hints(cls)
        for key, value in kwargs.items():
            ok, kwargs[key] = _typed(hints[key], value)
            if not ok:
                raise T5ForgeError(
                    f"{source}: key {key!r} has value {value!r} of the wrong type (expected {_type_name(hints[key])})"
                )
        try:
            return cls(**kwargs)
        except T5ForgeError as err:
            raise T5ForgeError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path) -> "T5Config":
        """A t5forge `model_config.json` (every field) or an HF `config.json` (HF's keys only)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise T5ForgeError(f"model config {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise T5ForgeError(f"{path} is not valid JSON ({err})") from None
        if path.name == run_layout.MODEL_CONFIG:  # t5forge's own config file (model/load.py writes it)
            return cls.from_json_dict(d, source=str(path))
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that `transformers.T5Config` (and T5ForConditionalGeneration) accept:
        HF's keys only (export refuses a model whose t5forge-only fields HF cannot represent)."""
        return {"architectures": [FAMILIES[self.model_type]], **HF_CONSTANT_KEYS,
                **{key: getattr(self, key) for key in HF_CONFIG_KEYS}}

    def to_json_dict(self) -> dict:
        """`to_hf_dict` plus every t5forge-only field: what `model_config.json` holds."""
        return {**self.to_hf_dict(), **{key: getattr(self, key) for key in self.t5forge_only_fields()}}

    # ------------------------------------------------------------------ built-in shapes
    @classmethod
    def from_name(cls, name: str, **overrides) -> "T5Config":
        """The architecture of a known public checkpoint (or "tiny" for tests), known offline."""
        key = name.removeprefix("google-t5/")
        if key not in _KNOWN:
            raise T5ForgeError(
                f"unknown model name {name!r}; built-in architectures are {sorted(_KNOWN)} "
                "(or load a checkpoint directory holding config.json)"
            )
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise T5ForgeError(f"model config: unknown field(s) {unknown}")
        # Built from scratch (not `replace`) so that an overridden num_layers also sets the decoder depth.
        return cls(**{**_KNOWN[key], **overrides})


_V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_ORIGINAL = dict(feed_forward_proj="relu", tie_word_embeddings=True)
_MT5 = dict(vocab_size=250112, model_type="mt5", **_V1_1)  # mT5: v1.1's shapes, 250,112 embedding rows
_SHAPES = {
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
}
_KNOWN = {
    **{f"google/t5-v1_1-{size}": dict(**shape, **_V1_1) for size, shape in _SHAPES.items()},
    # The LM-adapted v1.1 checkpoints (prefix-LM continued training) are v1.1's architecture.
    **{f"google/t5-{size}-lm-adapt": dict(**shape, **_V1_1) for size, shape in _SHAPES.items()},
    **{f"google/mt5-{size}": dict(**shape, **_MT5) for size, shape in _SHAPES.items()},
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, **_ORIGINAL),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, **_ORIGINAL),
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **_V1_1),
}
KNOWN_NAMES = tuple(_KNOWN)


def _typed(annotation, value) -> tuple[bool, object]:
    """(whether a JSON `value` fits the field `annotation`, the value as the field holds it).

    Knows what JSON can carry: bool, int, float (an int is accepted and widened), str, None,
    unions of them (`int | None`), Literal[...], and tuple/list of those (a JSON list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            ok, converted = _typed(arm, value)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = []
        for item in value:
            ok, converted = _typed(args[0], item) if args else (True, item)
            if not ok:
                return False, value
            items.append(converted)
        return True, origin(items)
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    raise T5ForgeError(f"model config: field type {annotation!r} cannot be read from JSON; use a JSON type")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("NoneType", "None")
