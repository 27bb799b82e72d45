"""Learning-rate schedules as pure functions of the step: ``factor = schedule(step)`` multiplies the base lr.

The builder wraps them in ``torch.optim.lr_scheduler.LambdaLR`` and steps it once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from marginlab.checks import check_float
from marginlab.errors import ConfigError


class Schedule:
    """Linear warm-up over ``warmup_epochs``, then ``after_warmup(step)``."""

    def __init__(self, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0):
        self.total_steps = max(1, int(total_steps))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        warmup = check_float("sched.warmup_epochs", warmup_epochs, low=0.0)
        self.warmup_steps = min(int(round(warmup * self.steps_per_epoch)), self.total_steps - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def progress(self, step: int) -> float:
        """Fraction of the post-warm-up steps done, in [0, 1]."""
        return min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))


class ConstantSchedule(Schedule):
    def after_warmup(self, step: int) -> float:
        return 1.0


class CosineSchedule(Schedule):
    """Cosine annealing (Loshchilov & Hutter 2017) from 1 to ``min_lr_ratio``."""

    def __init__(self, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0):
        super().__init__(total_steps, steps_per_epoch, warmup_epochs)
        self.min_lr_ratio = check_float("sched.min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)

    def after_warmup(self, step: int) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))


class MultiStepSchedule(Schedule):
    """lr x gamma at each milestone; a milestone < 1 is a fraction of the run, >= 1 an epoch."""

    def __init__(
        self,
        total_steps: int,
        steps_per_epoch: int,
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ):
        super().__init__(total_steps, steps_per_epoch, warmup_epochs)
        self.gamma = check_float("sched.gamma", gamma, low=0.0, high=1.0)
        steps = []
        for i, mile in enumerate(milestones):
            mile = check_float(f"sched.milestones[{i}]", mile, low=0.0, low_inclusive=False)
            steps.append(int(round(mile * self.total_steps)) if mile < 1 else int(round(mile * self.steps_per_epoch)))
        if steps != sorted(steps):
            raise ConfigError(f"sched.milestones={list(milestones)} is not allowed: milestones must increase")
        self.milestone_steps = steps

    def after_warmup(self, step: int) -> float:
        return self.gamma ** sum(step >= s for s in self.milestone_steps)
