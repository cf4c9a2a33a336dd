"""Reading and writing run configs: presets, YAML files and `a.b=value` into a RunConfig, and back.

    cfg = load_config(["task=pt_cpu", "optim.total_steps=500"])   # -> RunConfig (frozen)
    cfg = with_run_dir(cfg, "pretrain")                           # out_dir named, local paths absolute
    save_config(cfg, "run/config.yaml")                           # reloads strictly: config=run/config.yaml

Layering, later wins: defaults (nanoT5's default.yaml) < `base` < `task=NAME` preset < `config=PATH`
< `a.b=value` overrides in argv order. Unknown keys and values of the wrong type are a T5ForgeError
that names the key and lists the valid keys of its section. The schema and its rules are
`t5forge.config`; every loaded config has passed its `validate`.
"""

import dataclasses
import logging
import os
import re
import typing
from pathlib import Path
from typing import List

from t5forge.config import (
    RETIRED_KEYS, RunConfig, _describe_type, _is_section, _resolve, _type_hints, _unknown_key_message, validate,
)
from t5forge.errors import T5ForgeError

log = logging.getLogger(__name__)


def _drop_retired(d: dict, source: str) -> dict:
    """`d` (a config file's mapping) without RETIRED_KEYS, each dropped with a warning."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for key, why in RETIRED_KEYS.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name in out[section]:
            del out[section][name]
            log.warning("%s: ignoring %s, no longer a config key (%s); delete the line", source, key, why)
    return out


def _check_mapping(d, cls, prefix: str, source: str) -> None:
    """Every key of a (nested) mapping from a YAML file or preset exists in the schema."""
    hints = _type_hints(cls)
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            raise T5ForgeError(_unknown_key_message(path, str(k), cls, prefix, source))
        if _is_section(hints[k]):
            if not isinstance(v, dict):
                raise T5ForgeError(f"{source}: {path} is a section; give its keys ({path}.KEY: value), not {v!r}")
            _check_mapping(v, hints[k], path, source)


def _omegaconf():
    from omegaconf import OmegaConf  # imported late: `t5forge --help` stays fast

    return OmegaConf


def _merge(conf, patch: dict, source: str):
    """Merge a nested dict into the structured DictConfig; type errors name the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _omegaconf().merge(conf, patch)
    except OmegaConfBaseException as err:
        key = re.sub(r"\[\d+\]$", "", getattr(err, "full_key", None) or "?")
        try:
            tp = _resolve(key, source)[0]
        except T5ForgeError:
            tp = None
        value = _lookup(patch, key)
        expected = f"; expected {_describe_type(tp)}" if tp is not None else ""
        raise T5ForgeError(f"{source}: bad value {value!r} for config key {key!r}{expected}") from None


def _lookup(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return "?"
        d = d[part]
    return d


def _nest(path: str, value) -> dict:
    out = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _parse_value(text: str):
    """YAML scalar/list parsing as OmegaConf does it (1e-5 is a float, [a,b] a list, null is None)."""
    parsed = _omegaconf().from_dotlist([f"v={text}"])
    return _omegaconf().to_container(parsed)["v"]


def _read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise T5ForgeError(f"config file {path} not found")
    try:
        loaded = _omegaconf().load(p)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise T5ForgeError(f"config file {path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    data = _omegaconf().to_container(loaded)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise T5ForgeError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(argv_overrides: list[str], base=None) -> RunConfig:
    """Resolve `task=NAME`, `config=PATH` and `a.b=value` items into a validated, frozen RunConfig.

    `base` (optional): a preset name or a RunConfig to start from, e.g. the finetune command passes
    `base="ft"`. Layering: defaults < base < task preset < config file < overrides (argv order).
    """
    from t5forge.presets import get_preset

    OmegaConf = _omegaconf()
    task, config_path, overrides = None, None, []
    for item in argv_overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise T5ForgeError(f"expected KEY=VALUE (e.g. optim.base_lr=1e-2, task=pt_cpu, config=run.yaml), got {item!r}")
        if key.startswith(("+", "~", "-")):
            raise T5ForgeError(f"{item!r}: write plain KEY=VALUE; every key already exists (see --print-config)")
        if key == "task":
            if task is not None:
                raise T5ForgeError(f"task= given twice ({task!r} and {value!r}); give one preset")
            task = value
        elif key == "config":
            if config_path is not None:
                raise T5ForgeError(f"config= given twice ({config_path!r} and {value!r}); give one file")
            config_path = value
        else:
            overrides.append((key, value, item))

    conf = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(conf, False)  # frozen dataclasses give a read-only DictConfig; we merge into it
    if isinstance(base, RunConfig):
        conf = _merge(conf, config_to_dict(base), "base config")
    elif base is not None:
        conf = _merge(conf, _checked(get_preset(base), f"preset {base!r}"), f"preset {base!r}")
    if task is not None:
        conf = _merge(conf, _checked(get_preset(task), f"preset {task!r}"), f"preset {task!r}")
    if config_path is not None:
        source = f"config file {config_path}"
        conf = _merge(conf, _checked(_drop_retired(_read_yaml(config_path), source), source), source)
    for key, text, item in overrides:
        source = f"override {item!r}"
        tp, _ = _resolve(key, source)
        if _is_section(tp):
            raise T5ForgeError(f"{source}: {key} is a section; set one of its keys, e.g. {key}.{next(iter(_type_hints(tp)))}=...")
        value = _parse_value(text)
        if typing.get_origin(tp) in (list, List) and isinstance(value, (str, int, float)):
            value = [str(value)]  # data.train_files=one.json.gz is a one-file list
        conf = _merge(conf, _nest(key, value), source)

    cfg = _normalise(OmegaConf.to_object(conf))
    validate(cfg)
    return cfg


def _checked(d: dict, source: str) -> dict:
    _check_mapping(d, RunConfig, "", source)
    return d


def _normalise(cfg: RunConfig) -> RunConfig:
    """Spellings that YAML turns into other types (resume: false -> "False") back to canonical ones."""
    resume = cfg.resume.strip()
    if resume.lower() in ("false", "no", "none", "null", "off", ""):
        resume = "false"
    elif resume.lower() in ("auto", "true", "yes", "on"):
        resume = "auto"
    return dataclasses.replace(cfg, resume=resume) if resume != cfg.resume else cfg


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML; `load_config(["config=FILE"])` gives back an equal RunConfig."""
    body = _omegaconf().to_yaml(_omegaconf().create(config_to_dict(cfg)), sort_keys=False)
    command = "pretrain" if cfg.mode == "pt" else "finetune"
    return (f"# t5forge run config (resolved). Reproduce: t5forge {command} config=THIS_FILE out_dir=NEW_DIR\n"
            f"# Continue this run where its last checkpoint left it: t5forge {command} config=THIS_FILE resume=auto\n"
            + body)


# How one process runs, not what the run is: `stop_at_step=70` would otherwise make every relaunch
# of the saved config stop at 70 again, and a saved `resume=PATH` would point at a stale checkpoint.
PROCESS_KEYS = {"resume": "false", "stop_at_step": 0}


def run_definition(cfg: RunConfig) -> RunConfig:
    """`cfg` with the process instructions (resume, stop_at_step) at their neutral defaults: what the
    run's config.yaml and every checkpoint's copy hold."""
    return dataclasses.replace(cfg, **PROCESS_KEYS)


def run_config_text(cfg: RunConfig) -> str:
    """The text of a run's config.yaml (and of each checkpoint's copy)."""
    return config_to_yaml(run_definition(cfg))


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_if_local(spec: str) -> str:
    """A path that exists here made absolute; anything else (a Hub id, '') unchanged."""
    return _absolute(spec) if spec and os.path.exists(os.path.expanduser(spec)) else spec


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with every local path absolute, so its saved config reruns from any directory.

    Files, globs and out_dir are always local; data.tokenizer, model.checkpoint_path and model.name
    can also be Hub ids, which stay as written (as do built-in architecture names: `tiny` means
    the built-in model even when a folder of that name is here, see plan.resolve_model_config).
    """
    from t5forge.model.config import KNOWN_NAMES

    m, d, f = cfg.model, cfg.data, cfg.finetune
    files = lambda specs: [_absolute(s) for s in specs]  # noqa: E731
    builtin = m.name.removeprefix("google-t5/") in KNOWN_NAMES and not m.name.startswith((".", "/", "~"))
    return dataclasses.replace(
        cfg,
        out_dir=_absolute(cfg.out_dir) if cfg.out_dir else "",
        model=dataclasses.replace(
            m, checkpoint_path=_absolute_if_local(m.checkpoint_path),
            name=m.name if builtin else _absolute_if_local(m.name),
        ),
        data=dataclasses.replace(
            d, train_files=files(d.train_files), validation_files=files(d.validation_files),
            tokenizer=_absolute_if_local(d.tokenizer),
        ),
        finetune=dataclasses.replace(
            f, sni_dir=_absolute(f.sni_dir) if f.sni_dir else "", train_files=files(f.train_files),
            validation_files=files(f.validation_files),
        ),
    )


def with_run_dir(cfg: RunConfig, command: str) -> RunConfig:
    """The config a run uses: an empty `out_dir` named `runs/<command>-<date>-<time>` and every local
    path absolute (`absolute_paths`), so the saved config names the directory the run really writes
    and reruns from any working directory."""
    if cfg.out_dir:
        return absolute_paths(cfg)
    if cfg.resume == "auto":
        # A generated name differs at every launch: a relaunch would never find its checkpoints.
        raise T5ForgeError(
            "resume=auto needs out_dir=DIR: without it every launch makes a new timestamped run "
            "directory, so a relaunch would start from scratch instead of resuming"
        )
    import time

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks would each pick their own timestamp: the run directory must be named up front.
        raise T5ForgeError("set out_dir=DIR when launching several processes (torchrun)")
    return absolute_paths(dataclasses.replace(cfg, out_dir=time.strftime(f"runs/{command}-%Y%m%d-%H%M%S")))


def save_config(cfg: RunConfig, path) -> None:
    """Write the run's definition (`run_config_text`): `config=PATH` reruns it, `resume=auto` continues it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_text(cfg))
