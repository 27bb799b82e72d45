"""Bad values fail before any work, naming the key, the value and what is allowed; no traceback."""

from __future__ import annotations

import pytest

from .conftest import run_cli

FAST = ["logger=quiet", "trainer.epochs=1"]

CASES = [
    (["s=-1"], "s=-1.0 is not allowed"),
    (["head.m=abc"], "head.m='abc' is not allowed: it must be a number"),
    # enums in the schema (config/schema.py): OmegaConf refuses them as the config composes
    (["trainer.precision=fp8"], "trainer.precision=fp8 (Invalid value 'fp8', expected one of [auto, 32, bf16, fp16]"),
    (["trainer.best_on=vall"], "trainer.best_on=vall (Invalid value 'vall', expected one of [auto, val, test, last]"),
    (["head=softmax", "m=0.3"], "has no parameter 'm'"),
    (["+head.margin=0.3"], "head.margin is not a parameter of AMSoftmaxHead; its parameters are: s, m"),
    (["trainer.device=tpu"], "trainer.device=tpu (Invalid value 'tpu', expected one of [auto, cpu, cuda]"),
    (["trainer.device=cuda:1"], "trainer.device); pick the GPU with trainer.device=cuda trainer.device_index=1"),
    (["trainer.device_index=1"], "trainer.device_index=1 picks a GPU, so it needs trainer.device=cuda (not auto)"),
    (["trainer.device=cuda", "trainer.device_index=-1"], "trainer.device_index=-1 is not allowed: choose 0 or more"),
    (["trainer.epochs=0"], "trainer.epochs=0 is not allowed"),
    (["dataset.batch_size=0"], "dataset.batch_size=0 is not allowed"),
    (["head=arcface", "m=2"], "m=2.0 is not allowed: it must lie in [0, 1.5708]"),
    (["backbone.embedding_dim=-3"], "backbone.embedding_dim=-3 is not allowed"),
    (["resume=/nonexistent/run"], "resume='/nonexistent/run' is not allowed"),
    (["head.partial_fc.sample_rate=1.5"], "head.partial_fc.sample_rate=1.5 is not allowed: it must lie in (0, 1]"),
    (["+head.partial_fc.rate=0.5"], "its only key is sample_rate"),
    (["head=softmax", "+head.partial_fc.sample_rate=0.5"], "Partial FC needs a cosine margin head"),
    (["head=curricularface", "+head.partial_fc.sample_rate=0.5"], "Partial FC cannot shard CurricularFaceHead"),
    (["head=uniface", "+head.partial_fc.sample_rate=0.5"], "Partial FC cannot shard UniFaceHead: it is a loss of"),
    (["head=sface", "+head.partial_fc.sample_rate=0.5"], "Partial FC cannot shard SFaceHead: it is a loss of its"),
    (["head=uniface", "+head.chunked=true"], "chunked=true is not allowed with UniFaceHead: the chunked cross-entr"),
    (["head=sface", "+head.chunked=auto"], "chunked='auto' is not allowed with SFaceHead: the chunked cross-entro"),
    (["head.partial_fc.sample_rate=0.5", "regularizer=center"], "cannot be combined with head.partial_fc"),
    (
        ["head=normface", "head.learnable_scale=true", "head.partial_fc.sample_rate=0.5"],
        "use a fixed s with Partial FC",
    ),
    (["trainer.stop_after_epoch=0"], "trainer.stop_after_epoch=0 is not allowed: it must be null or an integer from"),
    (["trainer.stop_after_epoch=-1"], "trainer.stop_after_epoch=-1 is not allowed"),
    (["trainer.stop_after_epoch=2"], "stop_after_epoch=2 is not allowed: it must be null or an integer from 1 to trai"),
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


# ---- the path of a config value: validate() resolves the head once; the builder consumes that (issue #17)


@pytest.mark.parametrize("override", ["logger.wandb.mode=online", "logger.mlflow.tracking_uri=sqlite:///x.db"])
@pytest.mark.parametrize("sweep", [[], ["-m"]], ids=["run", "sweep"])
def test_a_tracker_key_without_its_logger_says_to_choose_it_in_one_line(capfd, override, sweep):
    """logger.wandb is null unless logger=wandb: setting a key under it was an AssertionError traceback."""
    tracker = override.split(".")[1]
    code = run_cli("train", *sweep, *FAST, override)
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"choose logger={tracker} first" in err, err


# ---- trainer.precision and trainer.best_on are enums of the schema (issue #26)


def test_a_sweep_with_a_bad_precision_starts_no_job(outputs_dir, capfd):
    """The value is refused as each job composes, so the good job does not run first (it did: only the bad job
    failed, in validation)."""
    code = run_cli("train", "-m", *FAST, "trainer.precision=32,fp8")
    err = capfd.readouterr().err
    assert code == 2 and "no job was started" in err and "Traceback" not in err
    assert "trainer.precision=fp8 (Invalid value 'fp8', expected one of [auto, 32, bf16, fp16]" in err
    assert not list(outputs_dir.rglob("metrics.json"))


@pytest.fixture(scope="module")
def compose_train():
    """``compose_train(*overrides)``: the composed ``marginlab train`` config, not yet validated."""
    from hydra import compose, initialize_config_module

    import marginlab.config  # noqa: F401  (the schema and resolvers)

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        yield lambda *overrides: compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, m",
    [(["head=sphereface", "m=3.0"], 3), (["head=lsoftmax", "m=2"], 2), (["head=amsoftmax", "m=0.3", "s=10"], 0.3)],
)
def test_validate_returns_the_resolved_head_the_builder_consumes(compose_train, overrides, m):
    from marginlab.training.builders import build_head

    cfg = compose_train(*overrides)
    spec = validate_config(cfg)
    assert spec.cls.__name__ == cfg.head._target_.rpartition(".")[2] and spec.sample_rate is None
    assert spec.kwargs["m"] == m and type(spec.kwargs["m"]) is type(m)  # an integer margin takes a whole m as int
    assert cfg.head.m == m and type(cfg.head.m) is type(m)  # the saved config records what the head got
    assert "partial_fc" not in spec.kwargs and "_target_" not in spec.kwargs
    head = build_head(spec, in_features=4, num_classes=3)
    assert type(head) is spec.cls and head.m == m


def test_a_fractional_m_for_an_integer_margin_is_refused_with_the_heads_message(compose_train):
    from marginlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^head\.m=2\.5 is not allowed: it must be an integer \(LSoftmaxHead\.m\)$"):
        validate_config(compose_train("head=lsoftmax", "m=2.5"))


def test_partial_fc_is_split_off_once_into_the_spec(compose_train):
    spec = validate_config(compose_train("head=arcface", "head.partial_fc.sample_rate=0.5"))
    assert spec.sample_rate == 0.5 and "partial_fc" not in spec.kwargs


def test_the_head_is_imported_and_its_signature_read_once(compose_train, monkeypatch):
    """Shorthands, key and type checks and Partial FC's check share one import and one signature of the head."""
    from marginlab.config import validate as validation

    head_reads, imports = [], []
    real_signature, real_import = validation.signature_params, validation.import_target
    monkeypatch.setattr(validation, "signature_params", lambda t: head_reads.append(t) or real_signature(t))
    monkeypatch.setattr(validation, "import_target", lambda p, k: imports.append(k) or real_import(p, k))
    spec = validate_config(compose_train("head=arcface", "m=0.4", "s=32", "head.partial_fc.sample_rate=0.5"))
    assert head_reads.count(spec.cls) == 1 and imports.count("head") == 1


def validate_config(cfg):
    from marginlab.config.validate import validate

    return validate(cfg)
