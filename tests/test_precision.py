"""trainer.precision's rules and its optimizer step, one object (training/precision.py); the allowed values are the
schema's enum (tests/test_validation.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from marginlab.errors import ConfigError
from marginlab.training.precision import Precision

CPU = torch.device("cpu")


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="fp16"):
        Precision(CPU, "fp16")


def test_auto_is_bf16_on_cuda_and_32_elsewhere():
    assert Precision.from_setting("auto", CPU).name == "32"
    assert Precision.from_setting("bf16", CPU).name == "bf16"
    if torch.cuda.is_available():
        assert Precision.from_setting("auto", torch.device("cuda")).name == "bf16"


def test_fp16_is_refused_with_a_head_sharded_over_several_processes():
    fp16 = object.__new__(Precision)  # fp16 needs CUDA to build; the rule itself does not
    fp16.name = "fp16"
    with pytest.raises(ConfigError, match="not allowed with head.partial_fc on several processes"):
        fp16.check_sharded(True)
    fp16.check_sharded(False)
    for name in ("32", "bf16"):
        Precision(CPU, name).check_sharded(True)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_a_step_is_backward_clip_and_step_as_written_out(clip):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 4)
    ours, theirs = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    Precision(CPU, "32")(model(x).square().mean(), ours, clip, model.parameters())
    twin(x).square().mean().backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), clip)
    theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
