"""Learning-rate schedules as pure functions of the step: `lr = schedule(step)`.

`step` is the number of optimizer steps already taken (0 for the first update), so a resumed run
needs only its step count, never a scheduler state. It may be fractional: with a time budget the
trainer passes `fraction_of_budget * total_steps` (see t5forge.plan.Plan.schedule_step).

- cosine: nanoT5's (torch LinearLR(start_factor=0.5) for warmup_steps, then CosineAnnealingLR down
  to eta_min=final_cosine, an absolute lr): base_lr * (0.5 + 0.5 * step / warmup) during warmup,
  then final + (base - final) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2, and `final`
  from total_steps on.
- legacy: nanoT5's "legacy" T5 schedule, independent of base_lr: min(1e-2, 1/sqrt(step)) (1e-2 at
  step 0) for the first ceil(0.9 * total) steps, then linear decay to 0 at total_steps.
- inverse_sqrt: T5's rsqrt decay, base_lr * sqrt(warmup / max(step, warmup)): flat during warmup.
  base_lr 1e-2 with warmup 10000 is exactly T5's min(1e-2, 1/sqrt(step)) (Adafactor's relative step).
- constant: base_lr, after an optional linear warmup from 0 (transformers' constant_with_warmup).
- linear: linear warmup from 0, then linear decay to 0 at total_steps (transformers' linear).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Cosine:
    base_lr: float
    warmup_steps: int
    total_steps: int
    final_lr: float

    def __call__(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (0.5 + 0.5 * step / self.warmup_steps)
        if step >= self.total_steps:
            return self.final_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.final_lr + (self.base_lr - self.final_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass(frozen=True)
class Legacy:
    total_steps: int

    def __call__(self, step: float) -> float:
        decay_start = math.ceil(self.total_steps * 0.9)
        if step < decay_start:
            return min(1e-2, 1.0 / math.sqrt(step)) if step > 0 else 1e-2
        peak = min(1e-2, 1.0 / math.sqrt(decay_start))
        decay_steps = self.total_steps - decay_start
        return peak * max(0.0, 1.0 - (step - decay_start) / decay_steps) if decay_steps > 0 else 0.0


@dataclass(frozen=True)
class InverseSqrt:
    base_lr: float
    warmup_steps: int

    def __call__(self, step: float) -> float:
        return self.base_lr * math.sqrt(self.warmup_steps / max(step, self.warmup_steps))


@dataclass(frozen=True)
class Constant:
    base_lr: float
    warmup_steps: int = 0

    def __call__(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        return self.base_lr


@dataclass(frozen=True)
class Linear:
    base_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        return self.base_lr * max(0.0, (self.total_steps - step) / (self.total_steps - self.warmup_steps))


def make_schedule(name: str, *, base_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0):
    """The schedule called `name` (optim.lr_scheduler) as a callable `step -> lr`."""
    if name == "cosine":
        return Cosine(base_lr, warmup_steps, total_steps, final_lr)
    if name == "legacy":
        return Legacy(total_steps)
    if name == "inverse_sqrt":
        return InverseSqrt(base_lr, warmup_steps)
    if name == "constant":
        return Constant(base_lr, warmup_steps)
    if name == "linear":
        return Linear(base_lr, warmup_steps, total_steps)
    raise ValueError(f"unknown lr schedule {name!r}")


def set_lr(optimizer, lr: float) -> None:
    """Write the schedule's lr into every parameter group, before `optimizer.step()`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
