"""HF transformers <-> t5forge: parameter names, loading an HF T5 directory, exporting one.

The families (T5Config.model_type): T5 (v1.0, v1.1, the LM-adapted v1.1), mT5 (T5ForConditionalGeneration's
math, MT5ForConditionalGeneration) and UMT5 (UMT5ForConditionalGeneration: a relative-bias table in
every layer). HF's layout differs from ours in three ways beyond names: the relative position bias lives in
block 0's SelfAttention of each stack (we keep it on the stack; UMT5: in every block's, we keep
the tables on the stack as `position.layers.{i}`), `shared`,
`encoder.embed_tokens` and `decoder.embed_tokens` are one tied tensor (we store `shared` only),
and `lm_head` is absent (tied to `shared`) unless tie_word_embeddings is False.

Export knows what HF's class for the family can express (`check_exportable`): the family's components
only (HF_COMPONENTS), and exactly the parameters `hf_parameter_shapes` lists for the config; anything
else is refused before a file is written, since transformers would otherwise fill a missing weight at
random. config.json keeps model_type and architectures, so an mT5 exports as an mT5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from t5forge.errors import T5ForgeError
from t5forge.model.components import HF_COMPONENTS, HF_T5
from t5forge.model.config import T5Config

# The attribute of t5forge's Stack that holds its position scheme (the T5 relative bias), as it
# appears in parameter names: "{s}.<POSITION_MODULE>.weight". model/load.py renames older names.
POSITION_MODULE = "position"
# (HF name, t5forge name); {s} = stack, {i} = block index, {p} = projection.
_NAME_TEMPLATES = [
    ("shared.weight", "shared.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("{s}.final_layer_norm.weight", "{s}.final_norm.weight"),
    ("{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "{s}." + POSITION_MODULE + ".weight"),
    ("{s}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
     "{s}." + POSITION_MODULE + ".layers.{i}.weight"),  # UMT5: a table in every layer
    ("{s}.block.{i}.layer.0.SelfAttention.{p}.weight", "{s}.blocks.{i}.attn.{p}.weight"),
    ("{s}.block.{i}.layer.0.layer_norm.weight", "{s}.blocks.{i}.attn_norm.weight"),
    ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight", "decoder.blocks.{i}.cross_attn.{p}.weight"),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.blocks.{i}.cross_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.{p}.weight", "encoder.blocks.{i}.ff.{p}.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.{i}.ff_norm.weight"),
    ("decoder.block.{i}.layer.2.DenseReluDense.{p}.weight", "decoder.blocks.{i}.ff.{p}.weight"),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.{i}.ff_norm.weight"),
]
_GROUPS = {"s": r"(?P<s>encoder|decoder)", "i": r"(?P<i>\d+)", "p": r"(?P<p>q|k|v|o|wi|wi_0|wi_1|wo)"}
# HF keys that carry no information of their own.
HF_REDUNDANT = (
    "encoder.embed_tokens.weight",  # = shared.weight
    "decoder.embed_tokens.weight",  # = shared.weight
    # HF builds it in every decoder's block 0 cross-attention but never uses it (and ignores it on load)
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)
# t5forge-only fields that say how to compute, not what: any value exports.
RUNTIME_ONLY = ("attention_backend",)
_KEEP = "keep the t5forge checkpoint (load it with t5forge.load_model) instead of exporting"
# How export messages name each family's HF class.
_LABEL = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}
# UMT5 keeps its tables in every block: on reading HF names, its rule for block 0 comes first.
_PER_LAYER_BIAS = {"umt5"}


def check_exportable(config: T5Config) -> None:
    """A one-line T5ForgeError naming the first part of `config` that HF's class for its family
    (config.model_type) cannot represent."""
    label = _LABEL[config.model_type]
    for field, hf_kind in HF_COMPONENTS[config.model_type].items():
        value = getattr(config, field)
        if value != hf_kind:
            other = [f for f, parts in HF_COMPONENTS.items()
                     if all(getattr(config, k) == v for k, v in parts.items()) and f != config.model_type]
            hint = f"; HF's {_LABEL[other[0]]} has it: model.model_type={other[0]}" if other else ""
            raise T5ForgeError(
                f"cannot export to HF {label}: model.{field}={value!r} has no HF {label} equivalent "
                f"(HF's {label} knows {hf_kind!r}{hint}); {_KEEP}"
            )
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(config)}
    for field in type(config).t5forge_only_fields():
        if field in HF_T5 or field in RUNTIME_ONLY:
            continue
        # A later t5forge-only field: its default is T5's behaviour, anything else is not HF's T5.
        value = getattr(config, field)
        if value != defaults[field]:
            raise T5ForgeError(
                f"cannot export to HF {label}: model.{field}={value!r} has no HF {label} equivalent "
                f"(HF's {label} has no such setting; only {defaults[field]!r} exports); {_KEEP}"
            )


def hf_parameter_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every parameter HF's class for `config` (T5/MT5/UMT5ForConditionalGeneration) has (without the
    tied aliases and unused tensors of HF_REDUNDANT), with its shape."""
    C, F, inner, H = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.num_heads
    shapes = {"shared.weight": (config.vocab_size, C)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    wi = ("wi_0", "wi_1") if config.is_gated else ("wi",)
    attention = {"q": (inner, C), "k": (inner, C), "v": (inner, C), "o": (C, inner)}
    for s, depth in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        for i in range(depth if config.model_type in _PER_LAYER_BIAS else 1):
            shapes[f"{s}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"] = (
                config.relative_attention_num_buckets, H)
        shapes[f"{s}.final_layer_norm.weight"] = (C,)
        for i in range(depth):
            sublayers = ["SelfAttention"] + (["EncDecAttention"] if s == "decoder" else []) + ["DenseReluDense"]
            for j, sublayer in enumerate(sublayers):
                prefix = f"{s}.block.{i}.layer.{j}"
                shapes[f"{prefix}.layer_norm.weight"] = (C,)
                if sublayer == "DenseReluDense":
                    shapes.update({f"{prefix}.{sublayer}.{p}.weight": (F, C) for p in wi})
                    shapes[f"{prefix}.{sublayer}.wo.weight"] = (C, F)
                else:
                    shapes.update({f"{prefix}.{sublayer}.{p}.weight": shape for p, shape in attention.items()})
    return shapes


def _compile(template: str):
    pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    for name, group in _GROUPS.items():
        pattern = pattern.replace("{" + name + "}", group)
    return re.compile(pattern + r"\Z")


_HF_TO_OURS = [(_compile(hf), ours) for hf, ours in _NAME_TEMPLATES]
# UMT5: block 0's table is layer 0's like every other block's (the per-layer rule before T5's).
_HF_TO_OURS_PER_LAYER = [rule for rule in _HF_TO_OURS if ".layers." in rule[1]] + [
    rule for rule in _HF_TO_OURS if ".layers." not in rule[1]]
_OURS_TO_HF = [(_compile(ours), hf) for hf, ours in _NAME_TEMPLATES]


def _rename(name: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_to_t5forge_name(name: str, model_type: str = "t5") -> str | None:
    """t5forge's name for HF's parameter `name` of a `model_type` model (FAMILIES), or None."""
    return _rename(name, _HF_TO_OURS_PER_LAYER if model_type in _PER_LAYER_BIAS else _HF_TO_OURS)


def t5forge_to_hf_name(name: str) -> str | None:
    return _rename(name, _OURS_TO_HF)


def hf_to_t5forge_state_dict(hf_sd: dict, config: T5Config, source: str = "checkpoint") -> dict:
    """HF T5 weights -> t5forge names (the tied aliases and HF's unused tensors are dropped)."""
    out = {}
    for name, tensor in hf_sd.items():
        if name in HF_REDUNDANT:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            shared = hf_sd.get("shared.weight")
            if shared is not None and not torch.equal(tensor, shared):
                raise T5ForgeError(
                    f"{source}: the config ties the output layer to the embedding, but lm_head.weight differs "
                    "from shared.weight; set tie_word_embeddings to false in config.json if it has its own lm_head"
                )
            continue
        ours = hf_to_t5forge_name(name, config.model_type)
        if ours is None:
            raise T5ForgeError(f"{source}: weight {name!r} is not part of a {_LABEL[config.model_type]} model; "
                               f"is this a {_LABEL[config.model_type]} checkpoint (config.json's model_type)?")
        out[ours] = tensor
    if "shared.weight" not in out:  # some exports keep only an embed_tokens copy of the tie
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in hf_sd:
                out["shared.weight"] = hf_sd[alias]
                break
    if not config.tie_word_embeddings and "lm_head.weight" not in out and "shared.weight" in out:
        # transformers >= 5 may save an unscaled ("v1.1") T5 whose lm_head is tied to the embedding
        # (lm_head then absent); an untied copy computes the same function.
        out["lm_head.weight"] = out["shared.weight"].clone()
    return out


def t5forge_to_hf_state_dict(sd: dict) -> dict:
    """t5forge weights -> HF names (what `export_hf` writes: no tied aliases)."""
    out = {}
    for name, tensor in sd.items():
        hf = t5forge_to_hf_name(name)
        if hf is None:
            raise T5ForgeError(
                f"cannot export to HF T5: the model's weight {name!r} has no place in HF's T5 "
                f"(a module HF's T5 lacks); {_KEEP}"
            )
        out[hf] = tensor
    return out


def check_hf_state_dict(hf_sd: dict, config: T5Config) -> None:
    """A T5ForgeError unless `hf_sd` holds exactly the parameters (and shapes) HF's class for the
    family has for `config`."""
    expected, label, family = hf_parameter_shapes(config), _LABEL[config.model_type], config.model_type
    missing = [name for name in expected if name not in hf_sd]
    if missing:
        raise T5ForgeError(
            f"cannot export to HF {label}: the model has no weight for HF's {_describe(missing, family)}; "
            f"transformers would initialise it at random. {_KEEP}"
        )
    extra = [name for name in hf_sd if name not in expected]
    if extra:
        raise T5ForgeError(
            f"cannot export to HF {label}: HF's {label} for this config has no {_describe(extra, family)}; {_KEEP}"
        )
    for name, shape in expected.items():
        if tuple(hf_sd[name].shape) != shape:
            raise T5ForgeError(
                f"cannot export to HF {label}: weight {name!r} has shape {tuple(hf_sd[name].shape)} but HF's "
                f"{label} for this config has {shape}; {_KEEP}"
            )


def _describe(names: list[str], model_type: str = "t5", limit: int = 4) -> str:
    """HF names, each with its t5forge name, so the message says which module to look at."""
    shown = [f"{n} (t5forge {hf_to_t5forge_name(n, model_type)})" for n in names[:limit]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_state_dict_strict(model, sd: dict, source: str) -> None:
    """Load weights, turning missing/unexpected keys and shape mismatches into one T5ForgeError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise T5ForgeError(
            f"{source} does not match the model config: missing weights {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected weights {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}; check that config and weights belong together"
        )
    for name, tensor in sd.items():
        if tensor.shape != expected[name].shape:
            raise T5ForgeError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected[name].shape)}; check that config and weights belong together"
            )
    model.load_state_dict(sd, strict=True)


def read_weights(directory: Path, names=("model.safetensors", "pytorch_model.bin")) -> tuple[dict, Path]:
    """The state dict stored in `directory` (first of `names` present) and the file it came from."""
    for name in names:
        path = directory / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(path)), path
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as err:  # corrupt / truncated files raise library-specific errors
                raise T5ForgeError(f"could not read weights {path} ({type(err).__name__}: {err})") from None
    if (directory / "model.safetensors.index.json").is_file() or (directory / "pytorch_model.bin.index.json").is_file():
        raise T5ForgeError(f"{directory} holds a sharded checkpoint; t5forge reads single-file weights only")
    raise T5ForgeError(f"{directory} holds no weights: expected one of {list(names)}")


def write_weights(sd: dict, path: Path) -> None:
    """Write a state dict as safetensors, readable as a plain open() would make it (0644 under umask
    022): safetensors' save_file creates the file 0600, which hides a checkpoint or an export from
    the rest of a group on a shared cluster."""
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it (Linux /proc), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_hf(directory, device="cpu", dtype=None, **overrides):
    """(model, tokenizer or None) from an HF T5, mT5 or UMT5 directory: config.json + model.safetensors or
    pytorch_model.bin, and spiece.model / tokenizer.json when present. `overrides` replace
    T5Config fields (attention_backend, dropout_rate, ...)."""
    from t5forge.model.t5 import T5

    directory = Path(directory)
    if not directory.is_dir():
        raise T5ForgeError(f"HF model directory {directory} does not exist")
    config = T5Config.from_json_file(directory / "config.json")
    if overrides:
        config = config.replace(**overrides)
    hf_sd, weights_path = read_weights(directory)
    sd = hf_to_t5forge_state_dict(hf_sd, config, source=str(weights_path))
    model = T5(config)
    load_state_dict_strict(model, sd, str(weights_path))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    tokenizer = None
    if (directory / "spiece.model").is_file() or (directory / "tokenizer.json").is_file():
        from t5forge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
    return model, tokenizer


def export_hf(model, tokenizer, directory) -> Path:
    """Write an HF directory that `AutoModelForSeq2SeqLM.from_pretrained` (T5, MT5 or UMT5
    ForConditionalGeneration, as config.model_type says) and `AutoTokenizer.from_pretrained` load:
    config.json, model.safetensors, generation_config.json, tokenizer files. A model HF's class
    cannot represent is a T5ForgeError, with nothing written."""
    config: T5Config = model.config
    # Everything is checked before the first file is written: a refused export leaves no directory behind.
    check_exportable(config)
    hf_sd = t5forge_to_hf_state_dict(model.state_dict())
    check_hf_state_dict(hf_sd, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in hf_sd.items()}
    write_weights(sd, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
