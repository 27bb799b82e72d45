"""Bad values fail before any work, naming the key, the value and what is allowed; no traceback."""

from __future__ import annotations

import pytest

FAST = ["logger=quiet", "trainer.epochs=1"]

CASES = [
    (["s=-1"], "s=-1.0 is not allowed"),
    (["head.m=abc"], "head.m='abc' is not allowed: it must be a number"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not allowed: choose one of auto, 32, bf16, fp16"),
    (["head=softmax", "m=0.3"], "has no parameter 'm'"),
    (["+head.margin=0.3"], "head.margin is not a parameter of AMSoftmaxHead; its parameters are: s, m"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not allowed"),
    (["trainer.epochs=0"], "trainer.epochs=0 is not allowed"),
    (["dataset.batch_size=0"], "dataset.batch_size=0 is not allowed"),
    (["head=arcface", "m=2"], "m=2.0 is not allowed: it must lie in [0, 1.5708]"),
    (["backbone.embedding_dim=-3"], "backbone.embedding_dim=-3 is not allowed"),
    (["resume=/nonexistent/run"], "resume='/nonexistent/run' is not allowed"),
    (["head.partial_fc.sample_rate=1.5"], "head.partial_fc.sample_rate=1.5 is not allowed: it must lie in (0, 1]"),
    (["+head.partial_fc.rate=0.5"], "its only key is sample_rate"),
    (["head=softmax", "+head.partial_fc.sample_rate=0.5"], "Partial FC needs a cosine margin head"),
    (["head=curricularface", "+head.partial_fc.sample_rate=0.5"], "Partial FC cannot shard CurricularFaceHead"),
    (["head.partial_fc.sample_rate=0.5", "regularizer=center"], "cannot be combined with head.partial_fc"),
    (["head=normface", "head.learnable_scale=true", "head.partial_fc.sample_rate=0.5"],
     "use a fixed s with Partial FC"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_value_is_one_clear_line(run_train, capfd, overrides, message):
    code, _ = run_train(*FAST, *overrides)
    err = capfd.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("overrides,key", [(["m=abc"], "m"), (["head=nope"], "head/nope")])
def test_hydra_level_errors_name_the_key(run_train, capfd, overrides, key):
    code, _ = run_train(*FAST, *overrides)
    err = capfd.readouterr().err
    assert code != 0 and key in err and "Traceback" not in err


def test_unknown_head_lists_the_available_heads(run_train, capfd):
    run_train("head=nope", *FAST)
    err = capfd.readouterr().err
    assert "Available options in 'head'" in err and "arcface" in err and "amsoftmax" in err


def test_dataset_root_that_is_a_file(run_train, capfd, tmp_path):
    bogus = tmp_path / "file.txt"
    bogus.write_text("x")
    code, _ = run_train("dataset=mnist", f"dataset.root={bogus}", "dataset.download=false", *FAST)
    err = capfd.readouterr().err
    assert code == 2 and "is not a directory" in err and str(bogus) in err
