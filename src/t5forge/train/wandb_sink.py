"""Weights & Biases logging (`logging.wandb=true`): the run's config, train and eval metrics, and the
W&B run id kept in the run directory so a resumed run continues the same W&B run.

wandb is optional (`pip install wandb` or `t5forge[wandb]`) and used on rank 0 only, through
`MetricsLogger`. It reads its usual environment: `WANDB_MODE=offline` writes the run under
`RUN_DIR/wandb/offline-run-*` for a later `wandb sync`; `WANDB_API_KEY` or `wandb login` for
online runs; `WANDB_ENTITY`, `WANDB_NAME`, `WANDB_TAGS`, ... as documented by wandb.

Metric names are `KIND/KEY` as in TensorBoard (`train/loss`, `eval/eval_loss`), at the run's
optimizer step. W&B only accepts increasing steps, so steps it already holds are not sent again:
after a resume, the steps between the checkpoint and the point where the previous process stopped
keep the values that process sent (the same values, as resume is exact). `RUN_DIR/wandb-run.json`
remembers the run id and how far the history got.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from t5forge.errors import EXIT_ABORTED, RunStopped, T5ForgeError
from t5forge.run_layout import WANDB_RUN

RUN_FILE = WANDB_RUN
_LOCAL_MODES = ("offline", "dryrun", "disabled")  # modes that need no W&B account
_OFFLINE_HINT = "or set WANDB_MODE=offline to log into out_dir/wandb and upload later with `wandb sync`"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise T5ForgeError(
            "logging.wandb=true but Weights & Biases is not installed: pip install wandb, "
            "or set logging.wandb=false"
        ) from None
    return wandb


def check_usable() -> None:
    """Raise a T5ForgeError now, before any training, if W&B logging cannot start: wandb missing, or an
    online mode without credentials (wandb.init would then wait at an interactive login prompt on a
    terminal, and raise after the model is built elsewhere)."""
    wandb = _import_wandb()
    mode = wandb.setup().settings.mode  # WANDB_MODE, `wandb offline`, wandb's settings files
    if mode in _LOCAL_MODES:
        return
    if not wandb.login(prompt=False, verify=False):
        raise T5ForgeError(
            f"logging.wandb=true but W&B has no API key here (mode {mode}): run `wandb login` or set "
            f"WANDB_API_KEY, {_OFFLINE_HINT}; or set logging.wandb=false"
        )


def _exit_code(exc: BaseException | None) -> int:
    """The exit code the CLI gives for `exc`, so W&B shows a stopped or failed run as such."""
    if exc is None:
        return 0
    if isinstance(exc, RunStopped):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_ABORTED
    return 2 if isinstance(exc, T5ForgeError) else 1


class WandbSink:
    """One W&B run fed with MetricsLogger's records. `resume_step=None` starts a new W&B run (a new id);
    an integer continues the run named in RUN_DIR/wandb-run.json when there is one."""

    def __init__(self, run_dir: str | Path, *, project: str, config: dict, resume_step: int | None):
        wandb = _import_wandb()
        run_dir = Path(run_dir).resolve()
        self._file = run_dir / RUN_FILE
        saved = self._read_saved() if resume_step is not None else None
        # The last step W&B holds and which kinds of record it holds there; on a fresh W&B run, none.
        self._step = saved["step"] if saved else -1
        self._kinds = set(saved["kinds"]) if saved else set()
        try:
            self._run = wandb.init(
                project=project, config=config, dir=str(run_dir), id=saved["id"] if saved else None, resume="allow",
                name=None if os.environ.get("WANDB_NAME") else run_dir.name,
            )
        except Exception as err:  # noqa: BLE001 (network, credentials, server: the user's environment)
            raise T5ForgeError(
                f"logging.wandb=true but W&B could not start a run ({type(err).__name__}: {err}); "
                f"{_OFFLINE_HINT}, or set logging.wandb=false"
            ) from None
        self._save()

    def _read_saved(self) -> dict | None:
        try:
            saved = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return None  # no W&B run yet (or an unreadable file): a new one
        ok = isinstance(saved, dict) and isinstance(saved.get("id"), str) and isinstance(saved.get("step"), int)
        return {"kinds": [], **saved} if ok else None

    def _save(self) -> None:
        tmp = self._file.with_name(self._file.name + ".tmp")
        tmp.write_text(json.dumps({"id": self._run.id, "step": self._step, "kinds": sorted(self._kinds)}) + "\n")
        os.replace(tmp, self._file)

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl record (numbers only) unless W&B already holds its step and kind."""
        step, kind = record["step"], record["kind"]
        if step < self._step or (step == self._step and kind in self._kinds):
            return
        values = {f"{kind}/{key}": value for key, value in record.items()
                  if key not in ("step", "kind", "time") and isinstance(value, (int, float))
                  and not isinstance(value, bool)}  # flags such as eval's `best` are bookkeeping
        self._run.log(values, step=step)
        if step > self._step:
            self._step, self._kinds = step, set()
        self._kinds.add(kind)
        self._save()

    def finish(self, exc: BaseException | None, evals: Iterable[dict[str, Any]] = ()) -> None:
        """Write the best evaluation into the summary and close the W&B run (marked failed after an error)."""
        best = [r for r in evals if r.get("best") and r.get("eval_loss") is not None]
        if best:
            last = max(best, key=lambda r: r["step"])
            self._run.summary["best_eval_loss"] = last["eval_loss"]
            self._run.summary["best_eval_step"] = last["step"]
        self._run.finish(exit_code=_exit_code(exc))
