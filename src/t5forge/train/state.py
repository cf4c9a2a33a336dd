"""The counters of a training run: `TrainState`, saved as `train_state.json` in every checkpoint.

The run config is an immutable input; everything that changes while training (the step, how much
data went by, how much of the time budget is spent, the best evaluation so far) lives here, so a
resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from t5forge.errors import T5ForgeError

# Bumped when a field changes meaning; `from_dict` refuses states written by a newer format.
FORMAT_VERSION = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # encoder input tokens + decoder target tokens fed to the model
    examples_seen: int = 0  # examples (input, target pairs) trained on, all ranks; packed rows count each
    # Time counted against optim.time_budget: training steps only, without compile warm-up,
    # evaluation or checkpoint writing (see timing.Stopwatch).
    elapsed_train_seconds: float = 0.0
    elapsed_wall_seconds: float = 0.0  # everything, for the record
    epoch: int = 0  # completed passes over a finite (fine-tuning) data set
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    nonfinite_restarts: int = 0  # recoveries from the last checkpoint after a non-finite loss
    lr_factor: float = 1.0  # multiplies the schedule's learning rate; lowered by each rollback
    extra: dict = field(default_factory=dict)  # JSON-able values a caller wants kept with the run

    def update_best(self, eval_loss: float) -> bool:
        """Record an evaluation at the current step; True when it is the best so far."""
        if not math.isfinite(eval_loss):
            return False
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_eval_loss, self.best_eval_step = float(eval_loss), self.step
            return True
        return False

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "train state") -> "TrainState":
        d = dict(d)
        version = d.pop("format", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise T5ForgeError(
                f"{source} has format {version}, newer than this t5forge understands "
                f"({FORMAT_VERSION}); upgrade t5forge to resume from it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise T5ForgeError(f"{source} has unknown fields {unknown}; was it written by another tool?")
        state = cls(**d)
        for name in ("step", "tokens_seen", "examples_seen", "epoch", "nonfinite_restarts"):
            value = getattr(state, name)
            if not isinstance(value, int) or value < 0:
                raise T5ForgeError(f"{source}: field {name!r} must be a non-negative integer, got {value!r}")
        if not isinstance(state.lr_factor, (int, float)) or not 0.0 < state.lr_factor <= 1.0:
            raise T5ForgeError(f"{source}: field 'lr_factor' must be a number in (0, 1], got {state.lr_factor!r}")
        return state

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainState":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise T5ForgeError(f"{path} not found; is this a complete t5forge checkpoint?") from None
        except json.JSONDecodeError as err:
            raise T5ForgeError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None
        if not isinstance(d, dict):
            raise T5ForgeError(f"{path} must hold a JSON object")
        return cls.from_dict(d, source=str(path))
