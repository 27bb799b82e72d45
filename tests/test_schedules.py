from __future__ import annotations

import pytest

from marginlab.errors import ConfigError
from marginlab.training.schedules import ConstantSchedule, CosineSchedule, MultiStepSchedule


def test_cosine_with_warmup_hand_values():
    s = CosineSchedule(total_steps=110, steps_per_epoch=10, warmup_epochs=1, min_lr_ratio=0.0)
    assert [s(i) for i in range(3)] == pytest.approx([1 / 11, 2 / 11, 3 / 11])
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # halfway through the 100 post-warm-up steps: (1 + cos(pi/2)) / 2
    assert s(110) == pytest.approx(0.0, abs=1e-12)


def test_multistep_fractions_and_epochs():
    s = MultiStepSchedule(total_steps=100, steps_per_epoch=10, milestones=[0.5, 8], gamma=0.1)
    assert s.milestone_steps == [50, 80]
    assert s(49) == 1.0 and s(50) == pytest.approx(0.1) and s(80) == pytest.approx(0.01)


def test_constant_and_bad_values():
    assert ConstantSchedule(10, 5)(7) == 1.0
    with pytest.raises(ConfigError, match="milestones"):
        MultiStepSchedule(100, 10, milestones=[8, 2])
    with pytest.raises(ConfigError, match="sched.min_lr_ratio=2"):
        CosineSchedule(100, 10, min_lr_ratio=2)
