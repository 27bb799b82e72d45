"""``init_from=``: a new run starts from a checkpoint's weights -- the backbone always, the head when it fits --
and says which tensors it did not load; files that fit nothing are one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from marginlab.config.validate import resolve_head
from marginlab.training import builders
from marginlab.training.resume import compose_train_config
from marginlab.training.weights import init_from

QUIET = ["logger=quiet", "trainer.epochs=1"]


@pytest.fixture
def trained(run_train):
    """A run of 1 epoch on digits (AM-Softmax head, 10 classes) and its checkpoint's model state."""
    code, run_dir = run_train(*QUIET)
    assert code == 0
    return run_dir, torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]


def build(num_classes: int, *overrides: str):
    torch.manual_seed(1)
    cfg = compose_train_config(list(overrides))  # validated: the top-level m / s are in cfg.head
    return builders.build_model(cfg, 1, 8, num_classes, head=resolve_head(cfg.head))


def test_new_run_starts_from_the_backbone_and_lists_the_head_it_did_not_load(trained, run_train, monkeypatch, capsys):
    run_dir, saved = trained
    at_start = {}
    build_optimizer = builders.build_optimizer

    def spy(cfg, model):  # train.py builds the optimizer right after init_from: the weights training starts from
        at_start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return build_optimizer(cfg, model)

    monkeypatch.setattr(builders, "build_optimizer", spy)
    capsys.readouterr()
    code, new_dir = run_train(*QUIET, "head=subcenter_arcface", f"init_from={run_dir}")  # 3 sub-centres per class
    assert code == 0 and new_dir != run_dir
    backbone = [k for k in saved if k.startswith("backbone.")]
    assert backbone and all(torch.equal(at_start[k], saved[k]) for k in backbone)
    assert at_start["head.weight"].shape == (30, 64) and saved["head.weight"].shape == (10, 64)
    out = capsys.readouterr().out
    assert f"init_from {run_dir / 'checkpoints' / 'best.pt'}: loaded backbone ({len(backbone)} tensors)" in out
    assert "not loaded (they do not fit), left as initialised: head.weight [30, 64] (saved [10, 64])" in out


def test_a_different_class_count_loads_the_backbone_only(trained):
    run_dir, saved = trained
    model = build(7)
    message = init_from(model, run_dir)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k.startswith("backbone."))
    assert not torch.equal(state["head.weight"], saved["head.weight"][:7])
    assert message.endswith("left as initialised: head.weight [7, 64] (saved [10, 64])")


def test_a_head_that_fits_is_loaded_unless_init_from_head_is_false(trained):
    run_dir, saved = trained
    model = build(10)
    assert "loaded backbone" in init_from(model, run_dir) and "head (1 tensors)" in init_from(model, run_dir)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    fresh = build(10)
    before = fresh.head.weight.detach().clone()
    message = init_from(fresh, run_dir, head=False)
    assert torch.equal(fresh.head.weight, before)
    assert "not loaded (init_from_head=false), left as initialised: head.weight [10, 64] (saved [10, 64])" in message


def one_error_line(capfd) -> str:
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("marginlab: error: ")]
    assert len(err) == 1
    return err[0]


def test_init_from_head_true_with_a_head_that_does_not_fit_is_one_line(trained, run_train, capfd):
    run_dir, _ = trained
    capfd.readouterr()
    code, _ = run_train(*QUIET, "head=subcenter_arcface", f"init_from={run_dir}", "init_from_head=true")
    assert code == 2
    assert "init_from_head=true: head of" in one_error_line(capfd)


def test_files_that_are_not_checkpoints_or_fit_nothing_are_one_line(run_train, tmp_path, capfd):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    for path, message in (
        (text, f"{text}: not a loadable checkpoint"),
        (foreign, f"{foreign}: none of its 1 tensors fits this model's backbone (DigitsCNN)"),
        (tmp_path / "missing.pt", "init_from="),
    ):
        capfd.readouterr()
        code, _ = run_train(*QUIET, f"init_from={path}")
        assert code == 2
        assert message in one_error_line(capfd)
