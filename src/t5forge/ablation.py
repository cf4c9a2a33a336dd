"""`t5forge ablate`: the spec (base overrides, a budget, the arms, optional seeds) and each run's
state on disk (the results are t5forge.ablation_results').

A spec is a YAML file:

    base: [task=pt_cpu, data.train_files=[...], ...]   # pretrain overrides every arm shares
    budget: 5m                                          # per arm: a duration (optim.time_budget) or a
                                                        # step count (an int: optim.total_steps)
    arms:                                               # name -> its own overrides
      baseline: []
      squared_relu: [model.feed_forward=squared_relu]
    seeds: [0, 1]                                       # optional: every arm once per seed

Every arm trains into OUT/ARM (with `seeds`: once per seed, into OUT/ARM/seed-N, the seed its only
difference) with the same data, seed and evaluation settings (arms may not set
data.*, eval.*, seed, task or config), so their held-out NLLs are measured on the same batches.
OUT/ARM/ablate-arm.json records what the arm was run with and whether it finished: a finished arm
is not rerun, an unfinished one resumes (resume=auto), and one run with a different spec is refused;
each run's record holds only its own arm's overrides (and seed), so adding an arm or a seed to a spec
reruns nothing. With seeds the results give each arm's mean and per-seed NLLs, and the seed spread
of the first arm (the reference) as the noise to read the differences against.
Under a duration budget an arm stops when the time or base's optim.total_steps (the preset's when
unset) runs out, whichever comes first, and its lr schedule runs on the share of the budget spent
(plan.Plan.schedule_step): each arm warms up and decays within its budget, however fast it steps.
The warmup is warmup_steps / total_steps of the time, so total_steps is best a little above the
steps the fastest arm makes in the budget; far above, the warmup is over in the first seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from t5forge.durations import format_seconds, parse_time_budget
from t5forge.errors import T5ForgeError

TOP_KEYS = ("base", "budget", "arms", "seeds")
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Set by the ablation itself, for every arm alike.
OWNED = {"out_dir": "--out DIR", "resume": "the ablation (resume=auto)", "stop_at_step": "the ablation",
         "optim.total_steps": "budget:", "optim.time_budget": "budget:"}
# What makes the arms comparable: the same data, seed and held-out batches.
SHARED_KEYS = ("seed", "task", "config")
SHARED_SECTIONS = ("data.", "eval.")

ARM_FILE = "ablate-arm.json"
SEED_DIR = "seed-{}"  # OUT/ARM/seed-N: one run of an arm when the spec lists seeds


@dataclass(frozen=True)
class Budget:
    text: str
    steps: int | None = None
    seconds: float | None = None

    def items(self) -> list[str]:
        if self.steps is not None:
            return [f"optim.total_steps={self.steps}"]
        return [f"optim.time_budget={self.text}"]

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{format_seconds(self.seconds)} of training"


@dataclass(frozen=True)
class Run:
    """One training run: an arm, once (seed None: the base's seed) or at one of the spec's seeds."""
    arm: str
    seed: int | None
    dir: Path

    @property
    def label(self) -> str:
        return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"


@dataclass(frozen=True)
class Spec:
    path: Path
    base: tuple[str, ...]
    budget: Budget
    arms: dict  # name -> tuple of overrides, in the file's order
    seeds: tuple[int, ...] | None = None  # None: each arm runs once, at the base's seed

    def runs(self, out: Path) -> list[Run]:
        """Every run, arm by arm (each arm's seeds together), in the file's order."""
        if self.seeds is None:
            return [Run(arm, None, out / arm) for arm in self.arms]
        return [Run(arm, seed, out / arm / SEED_DIR.format(seed)) for arm in self.arms for seed in self.seeds]

    def items(self, run: Run) -> list[str]:
        """The pretrain items of one run: base < seed < budget < arm < where it runs."""
        seed = [] if run.seed is None else [f"seed={run.seed}"]
        return [*self.base, *seed, *self.budget.items(), *self.arms[run.arm], f"out_dir={run.dir}", "resume=auto"]

    def fingerprint(self, run: Run) -> dict:
        record = {"base": list(self.base), "budget": self.budget.text, "overrides": list(self.arms[run.arm])}
        return record if run.seed is None else {**record, "seed": run.seed}


def _overrides(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise T5ForgeError(f"{where} must be a list of KEY=VALUE overrides, e.g. [model.feed_forward=squared_relu]; "
                           f"got {value!r}")
    items = tuple(str(v) for v in value)
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise T5ForgeError(f"{where}: {item!r} is not KEY=VALUE (e.g. model.feed_forward=squared_relu)")
    return items


def _parse_budget(value, where: str) -> Budget:
    if isinstance(value, bool) or value is None:
        raise T5ForgeError(f"{where} is required: a duration per arm (5m, 1h30m) or a step count (an integer)")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        steps = int(value)
        if steps < 1:
            raise T5ForgeError(f"{where}={value!r}: a step budget must be >= 1")
        return Budget(str(steps), steps=steps)
    if not isinstance(value, str):
        raise T5ForgeError(f"{where}={value!r}: write a duration (5m, 1h30m) or a step count (an integer)")
    seconds = parse_time_budget(value, key=where)
    if seconds is None:
        raise T5ForgeError(f"{where} is empty: an ablation needs a budget per arm (5m, 1h30m, or a step count)")
    return Budget(value.strip(), seconds=seconds)


def _parse_seeds(value, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise T5ForgeError(f"{where} must be a non-empty list of seeds (integers >= 0), e.g. seeds: [0, 1]; "
                           f"got {value!r}")
    if len(set(value)) != len(value):
        raise T5ForgeError(f"{where} lists a seed twice: {value!r}")
    return tuple(value)


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec's shape (its overrides are checked against the config by `arm_configs`)."""
    path = Path(path)
    if not path.is_file():
        raise T5ForgeError(f"ablation spec {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise T5ForgeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise T5ForgeError(f"{path}: an ablation spec is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [str(k) for k in data if k not in TOP_KEYS]
    if unknown:
        raise T5ForgeError(f"{path}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(TOP_KEYS)}")
    base = _overrides(data.get("base"), f"{path}: base")
    budget = _parse_budget(data.get("budget"), f"{path}: budget")
    seeds = _parse_seeds(data.get("seeds"), f"{path}: seeds")
    for item in base:
        key = item.partition("=")[0].strip()
        if key == "seed" and seeds is not None:
            raise T5ForgeError(f"{path}: base sets seed, and seeds: lists the seeds every arm runs with; "
                               f"remove one of them")
        # Under a time budget, optim.total_steps stays the base's: the schedule's length and the step
        # cap (a run stops at whichever of the two ends first, as `t5forge pretrain` does).
        if key in OWNED and not (key == "optim.total_steps" and budget.seconds is not None):
            raise T5ForgeError(f"{path}: base sets {key}, which {OWNED[key]} sets for every arm; remove it")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise T5ForgeError(f"{path}: arms must name at least one arm, e.g. arms: {{baseline: [], "
                           f"squared_relu: [model.feed_forward=squared_relu]}}")
    parsed = {}
    for name, value in arms.items():
        if not isinstance(name, str) or not ARM_NAME.match(name):
            raise T5ForgeError(f"{path}: arm name {name!r} cannot be a directory name; use letters, digits, "
                               f"- and _ (at most 64, starting with a letter or digit)")
        items = _overrides(value, f"{path}: arms.{name}")
        for item in items:
            key = item.partition("=")[0].strip()
            if key in OWNED:
                raise T5ForgeError(f"{path}: arms.{name} sets {key}, which {OWNED[key]} sets for every arm")
            if key in SHARED_KEYS or key.startswith(SHARED_SECTIONS):
                raise T5ForgeError(f"{path}: arms.{name} sets {key}; every arm shares the data, seed and held-out "
                                   f"evaluation (set it in base: instead)")
        parsed[name] = items
    return Spec(path, base, budget, parsed, seeds)


def run_configs(spec: Spec, out: Path) -> dict:
    """Each run's resolved RunConfig (Run -> config), all checked before any run trains."""
    from t5forge.config_files import load_config, with_run_dir
    from t5forge.plan import resolve_model_config

    configs = {}
    for run in spec.runs(out):
        try:
            cfg = load_config(spec.items(run))
            if not cfg.model.checkpoint_path:
                # The architecture's own rules (e.g. hourglass needs a block to shorten) are checked
                # when the model is built: here, so that a bad last arm stops the ablation before the first.
                resolve_model_config(cfg)
        except T5ForgeError as err:
            raise T5ForgeError(f"{spec.path}: arm {run.arm}: {err}") from None
        if cfg.mode != "pt":
            raise T5ForgeError(f"{spec.path}: arm {run.arm} resolves to a fine-tuning config (mode={cfg.mode}); "
                               f"an ablation pre-trains (use a pt task in base:)")
        configs[run] = with_run_dir(cfg, "pretrain")
    return configs


def arm_status(arm_dir: Path, fingerprint: dict) -> str:
    """'done', 'partial' (resume it) or 'new'; refuses a directory another spec or command wrote."""
    marker = arm_dir / ARM_FILE
    if not marker.is_file():
        if arm_dir.exists() and any(arm_dir.iterdir()):
            raise T5ForgeError(f"{arm_dir} holds files that t5forge ablate did not write (no {ARM_FILE}); "
                               f"choose another --out or move it away")
        return "new"
    recorded = json.loads(marker.read_text())
    if recorded.get("spec") != fingerprint:
        raise T5ForgeError(f"{arm_dir} was trained with another spec ({recorded.get('spec')}, now {fingerprint}); "
                           f"delete {arm_dir} to rerun that arm, or choose another --out")
    return "done" if recorded.get("finished") else "partial"


def unseeded_conflict(spec: Spec, out: Path) -> None:
    """Refuse seeds inside an arm directory that a spec without seeds trained (and the other way round)."""
    for arm in spec.arms:
        arm_dir = out / arm
        if spec.seeds is not None and (arm_dir / ARM_FILE).is_file():
            raise T5ForgeError(f"{arm_dir} was trained by a spec without seeds: its runs would go inside that run; "
                               f"choose another --out, or move {arm_dir} away")
        seeded = sorted(arm_dir.glob(SEED_DIR.format("*"))) if arm_dir.is_dir() else []
        if spec.seeds is None and any((d / ARM_FILE).is_file() for d in seeded):
            raise T5ForgeError(f"{arm_dir} holds runs of a spec with seeds ({seeded[0].name}, ...); add its seeds: "
                               f"to the spec, or choose another --out")


def write_arm_marker(arm_dir: Path, fingerprint: dict, finished: bool, memory: dict | None = None) -> None:
    arm_dir.mkdir(parents=True, exist_ok=True)
    record = {"spec": fingerprint, "finished": finished, "memory": memory or {}}
    tmp = arm_dir / (ARM_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(arm_dir / ARM_FILE)


def reset_peak_memory() -> None:
    """Reset the process's peak RSS (Linux: clear_refs 5) and CUDA's peak, so the next arm reads its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_memory then reports the process's peak so far
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak memory since `reset_peak_memory`, in MiB, and what the number measures."""
    memory = {}
    try:
        status = Path("/proc/self/status").read_text()
        memory["peak_rss_mib"] = round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)
        memory["rss_measures"] = "peak resident memory of the ablate process during this arm (VmHWM, reset per arm)"
    except (OSError, AttributeError):
        import resource

        memory["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        memory["rss_measures"] = "peak resident memory of the ablate process so far (ru_maxrss; includes earlier arms)"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory
