"""logger=mlflow: a run's params, epoch metrics, checkpoints and status in a local MLflow store (no server)."""

from __future__ import annotations

import time

import pytest

from .conftest import TRACKER_ONLY, free_port, hide_module

pytest.importorskip("mlflow")

FAST = TRACKER_ONLY


def test_logger_mlflow_writes_a_finished_run_to_the_local_store(run_train, outputs_dir, metrics):
    from mlflow.tracking import MlflowClient

    code, run_dir = run_train("logger=mlflow", "trainer.epochs=2", *FAST, "optim.lr=0.05")
    assert code == 0
    assert (outputs_dir / "mlflow.db").is_file()  # the default store: under the outputs root
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("marginlab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["head"] == "amsoftmax" and float(run.data.params["optim.lr"]) == 0.05
    assert "logger.tensorboard" not in run.data.params
    history = client.get_metric_history(run.info.run_id, "test/acc")
    records = metrics[1](run_dir)
    assert [m.step for m in history] == [r["step"] for r in records] and len(history) == 2
    assert history[-1].value == pytest.approx(records[-1]["test/acc"])
    assert "best/" + metrics[0](run_dir)["best_metric"] in run.data.metrics
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= checkpoints
    assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_resumed_run_continues_its_mlflow_run(run_train, outputs_dir, metrics):
    from mlflow.tracking import MlflowClient

    code, run_dir = run_train("logger=mlflow", "trainer.epochs=2", "trainer.stop_after_epoch=1", *FAST)
    assert code == 0
    code, resumed = run_train("logger=mlflow", f"resume={run_dir}", *FAST)
    assert code == 0 and resumed == run_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("marginlab").experiment_id])  # one run, not two
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test/acc")
    assert [m.step for m in history] == [r["step"] for r in metrics[1](run_dir)] and len(history) == 2


def test_a_failed_run_ends_failed(tmp_path, outputs_dir):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from marginlab.logging import RunLog

    cfg = OmegaConf.create(
        {"seed": 0, "optim": {"lr": 0.1}, "logger": {"mlflow": {"tracking_uri": None, "experiment": "x"}}}
    )
    log = RunLog(tmp_path / "run", tensorboard=False, console=False)
    log.start(cfg)
    log.epoch_record({"epoch": 1, "step": 5, "test/acc": 0.5, "train/loss": float("nan"), "warnings": ["w"]})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert run.info.status == "FAILED" and run.data.params == {"seed": "0", "optim.lr": "0.1"}
    assert run.data.metrics["test/acc"] == 0.5


def test_logger_mlflow_without_mlflow_is_a_one_line_config_error(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from marginlab.errors import ConfigError
    from marginlab.logging.mlflow_tracker import MISSING, MlflowTracker

    hide_module(monkeypatch, "mlflow")
    cfg = OmegaConf.create({"logger": {"mlflow": {"tracking_uri": None, "experiment": "marginlab"}}})
    with pytest.raises(ConfigError, match="marginlab\\[mlflow\\]") as err:
        MlflowTracker.from_config(cfg, tmp_path)
    assert str(err.value) == MISSING and "\n" not in MISSING
    assert MlflowTracker.from_config(OmegaConf.create({"logger": {"mlflow": None}}), tmp_path) is None


@pytest.mark.parametrize("store", ["directory", "under_a_file", "not_a_database", "no_server"])
def test_an_unusable_store_fails_in_seconds_in_one_line(tmp_path, store):
    """MLflow retries a store it cannot open for minutes (~100 s for sqlite, ~4 min for a server), then raises a
    traceback: marginlab checks a sqlite file first and bounds the first request to a server."""
    from marginlab.errors import ConfigError
    from marginlab.logging.mlflow_tracker import MlflowTracker

    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("not a database, nor a directory\n")
    uri = {
        "directory": f"sqlite:///{tmp_path / 'a_dir'}",
        "under_a_file": f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}",
        "not_a_database": f"sqlite:///{tmp_path / 'a_file'}",
        "no_server": f"http://127.0.0.1:{free_port()}",
    }[store]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        MlflowTracker(tmp_path / "run", tracking_uri=uri)
    assert time.perf_counter() - start < 20
    message = str(err.value)
    assert "\n" not in message and f"cannot use the MLflow store {uri}" in message, message


def test_a_run_with_an_unusable_store_is_one_line_and_fast(run_train, tmp_path, capfd):
    (tmp_path / "a_dir").mkdir()
    start = time.perf_counter()
    code, run_dir = run_train("logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'a_dir'}", *FAST)
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot use the MLflow store" in err, err
    assert time.perf_counter() - start < 60  # the run's setup included; MLflow alone retried for ~100 s
