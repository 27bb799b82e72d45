"""Verification settings refused with one line naming the key, the value and what is allowed, when the target is
built (before anything is embedded, before a training epoch): ``far_target`` outside (0, 1) (a negative one gave
TAR 0), ``nfolds`` not an integer >= 1 (0 fell back to the set's own folds) or above the pairs of either kind; IJB's
``far_targets`` / ``headline_far`` likewise. ``nfolds: null`` still means the set's own folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from marginlab.commands.cli import main
from marginlab.errors import ConfigError
from marginlab.eval.ijb import IJBTarget
from marginlab.eval.verification import evaluate, evaluate_distances
from marginlab.eval.verification_sets import VerificationTarget

FAR_RULE = "is not allowed: it must be a number in (0, 1), a false accept rate (e.g. 1e-3)"
NFOLDS_RULE = "is not allowed: it must be an integer >= 1"
NULL = " or null (the set's own folds)"
BAD_FARS = [-1e-3, 0, 0.0, 1, 1.5, float("nan"), float("inf"), "1e-3", True, None]
BAD_NFOLDS = [0, -2, True, 2.5, 10.0, "10"]
ISSAME = [True, False, False, True, False, False, True, False, False, False]  # 3 same-identity, 7 different


def message(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    return text


def pairs(n: int = 40, same: int = 20):
    """``n`` pairs of 8-d embeddings, the first ``same`` of them near-duplicates."""
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    e2[:same] = e1[:same] + 0.1 * rng.normal(size=(same, 8))
    return e1, e2, np.arange(n) < same


class Flat(nn.Module):
    """A tiny backbone; ``calls`` counts the batches it embedded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 112 * 112, 16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x.flatten(1))


@pytest.fixture
def small_bin(tmp_path, face):
    """A 10-pair .bin: 3 same-identity, 7 different-identity pairs."""
    path = tmp_path / "lfw.bin"
    images = [face.encode(face.image(i)) for i in range(2 * len(ISSAME))]
    path.write_bytes(face.py2_bin_pickle(images, ISSAME))
    return path


# ---------------------------------------------------------------- evaluate()
@pytest.mark.parametrize("bad", BAD_FARS)
def test_evaluate_refuses_a_far_target_outside_0_1(bad):
    e1, e2, same = pairs()
    assert message(lambda: evaluate(e1, e2, same, nfolds=4, far_target=bad)) == f"far_target={bad!r} {FAR_RULE}"
    dist = np.sum((e1 - e2) ** 2, 1)
    assert message(lambda: evaluate_distances(dist, same, far_target=bad)) == f"far_target={bad!r} {FAR_RULE}"


@pytest.mark.parametrize("bad", [*BAD_NFOLDS, None])
def test_evaluate_refuses_nfolds_not_an_integer_from_1(bad):
    e1, e2, same = pairs()
    assert message(lambda: evaluate(e1, e2, same, nfolds=bad)) == f"nfolds={bad!r} {NFOLDS_RULE}"


def test_evaluate_accepts_the_edges_and_bounds_nfolds_by_the_pairs_of_either_kind():
    e1, e2, same = pairs(40, same=6)  # 6 same-identity, 34 different-identity
    for far in (1e-9, 1 - 1e-9, np.float32(0.25)):
        assert evaluate(e1, e2, same, nfolds=2, far_target=far)["far_target"] == pytest.approx(float(far))
    for nfolds in (1, 6, np.int64(3)):
        assert evaluate(e1, e2, same, nfolds=nfolds)["nfolds"] == nfolds
    expected = (
        "nfolds=7 is not allowed: it must be an integer in [1, 6], at most the pairs of either kind "
        "(6 same-identity, 34 different-identity)"
    )
    assert message(lambda: evaluate(e1, e2, same, nfolds=7)) == expected
    dist = np.sum((e1 - e2) ** 2, 1)
    assert message(lambda: evaluate_distances(dist, same, nfolds=7)) == expected
    # one kind only (AUC/EER undefined, as before): bounded by the pair count
    assert evaluate_distances(dist[:6], same[:6], nfolds=6)["nfolds"] == 6


# ---------------------------------------------------------------- VerificationTarget
@pytest.mark.parametrize("bad", BAD_NFOLDS)
def test_target_refuses_a_bad_nfolds_when_built(tmp_path, bad):
    build = lambda: VerificationTarget("lfw", str(tmp_path / "not_read.bin"), nfolds=bad)  # noqa: E731
    assert message(build) == f"verification.lfw.nfolds={bad!r} {NFOLDS_RULE}{NULL}"


@pytest.mark.parametrize("bad", BAD_FARS)
def test_target_refuses_a_bad_far_target_when_built(tmp_path, bad):
    build = lambda: VerificationTarget("cfp_fp", str(tmp_path / "not_read.bin"), far_target=bad)  # noqa: E731
    assert message(build) == f"verification.cfp_fp.far_target={bad!r} {FAR_RULE}"


def test_target_bounds_a_given_nfolds_by_its_set_when_built_and_null_keeps_the_sets_own(small_bin):
    expected = (
        "verification.lfw.nfolds=4 is not allowed: it must be an integer in [1, 3], at most the pairs of either "
        "kind (3 same-identity, 7 different-identity)"
    )
    assert message(lambda: VerificationTarget("lfw", str(small_bin), nfolds=4)) == expected
    edge = VerificationTarget("lfw", str(small_bin), nfolds=3, far_target=1 - 1e-9)
    result = edge.run(Flat(), image_size=112)
    assert result["nfolds"] == 3 and result["far_target"] == 1 - 1e-9
    own = VerificationTarget("lfw", str(small_bin), nfolds=None, far_target=1e-9)
    assert own.run(Flat(), image_size=112)["nfolds"] == 10  # null: the set's own 10 folds, as before


@pytest.mark.parametrize(
    "key,bad,expected",
    [
        ("nfolds", 0, f"verification.lfw.nfolds=0 {NFOLDS_RULE}{NULL}"),
        ("nfolds", 4, "verification.lfw.nfolds=4 is not allowed: it must be an integer in [1, 3]"),
        ("far_target", -1e-3, f"verification.lfw.far_target=-0.001 {FAR_RULE}"),
    ],
    ids=["nfolds=0", "nfolds=4", "far_target=-0.001"],
)
def test_run_checks_a_reassigned_setting_before_embedding(small_bin, key, bad, expected):
    target = VerificationTarget("lfw", str(small_bin))
    setattr(target, key, bad)
    backbone = Flat()
    assert message(lambda: target.run(backbone, image_size=112)).startswith(expected)
    assert backbone.calls == 0  # nothing embedded


# ---------------------------------------------------------------- IJB
@pytest.mark.parametrize(
    "fars,headline,expected",
    [
        (["1e-3"], 1e-4, f"verification.ijbc.far_targets[0]='1e-3' {FAR_RULE}"),
        ([1e-4, True], 1e-4, f"verification.ijbc.far_targets[1]=True {FAR_RULE}"),
        ([1e-4, 1.0], 1e-4, f"verification.ijbc.far_targets[1]=1.0 {FAR_RULE}"),
        ([float("nan")], 1e-4, f"verification.ijbc.far_targets[0]=nan {FAR_RULE}"),
        ([0], 1e-4, f"verification.ijbc.far_targets[0]=0 {FAR_RULE}"),
        (1e-4, 1e-4, "verification.ijbc.far_targets=0.0001 is not allowed: it must be a list of FARs in (0, 1), "),
        ([1e-4], -1e-4, f"verification.ijbc.headline_far=-0.0001 {FAR_RULE}"),
    ],
    ids=["string", "bool", "one", "nan", "zero", "not-a-list", "headline-negative"],
)
def test_ijb_refuses_a_far_outside_0_1_naming_the_entry(fars, headline, expected):
    build = lambda: IJBTarget("ijbc", "not_read", far_targets=fars, headline_far=headline)  # noqa: E731
    assert message(build).startswith(expected)


def test_ijb_accepts_fars_inside_0_1_and_refuses_the_bounds():
    edge = IJBTarget("ijbb", "not_read", far_targets=OmegaConf.create([1e-9, 1 - 1e-9]), headline_far=1e-9)
    assert edge.far_targets == [1e-9, 1 - 1e-9] and edge.headline_far == 1e-9
    build = lambda: IJBTarget("ijbb", "not_read", far_targets=[1e-4], headline_far=1)  # noqa: E731
    assert message(build) == f"verification.ijbb.headline_far=1 {FAR_RULE}"


# ---------------------------------------------------------------- the commands: one line at start-up, exit code 2
@pytest.mark.parametrize(
    "override,expected",
    [
        ("verification.lfw.nfolds=0", f"verification.lfw.nfolds=0 {NFOLDS_RULE}{NULL}"),
        ("+verification.lfw.far_target=-0.001", f"verification.lfw.far_target=-0.001 {FAR_RULE}"),
    ],
    ids=["nfolds=0", "far_target=-0.001"],
)
def test_eval_command_refuses_a_bad_setting_at_start_up(small_bin, face_checkpoint, capsys, override, expected):
    ckpt = face_checkpoint()
    args = ["eval", f"checkpoint={ckpt}", "verification=[lfw]", f"verification.lfw.path={small_bin}", "device=cpu"]
    assert main([*args, override]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"marginlab: error: {expected}" and captured.out == ""
    assert not (ckpt.parent / "best.eval").exists()  # nothing evaluated


def test_train_refuses_an_nfolds_above_the_pairs_at_start_up(small_bin, run_train, capfd):
    code, run_dir = run_train(
        "logger=quiet",
        "trainer.epochs=1",
        "trainer.checkpoint=false",
        "verification=[lfw]",
        f"verification.lfw.path={small_bin}",
        "verification.lfw.nfolds=5",
    )
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(
        "marginlab: error: verification.lfw.nfolds=5 is not allowed: it must be an integer in [1, 3]"
    )
    assert not (run_dir / "metrics.jsonl").exists()  # not one epoch trained
