"""Retrieval sets of unseen classes scored from the trainer every evaluated epoch (eval/retrieval_sets.py), on the
tiny fake trees of tests/data/test_retrieval_sets.py, and the selection on the val fold's MAP@R."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from marginlab.errors import ConfigError, DataError
from marginlab.eval.retrieval import retrieval_metrics
from marginlab.eval.retrieval_sets import check_retrievable, run_retrieval, tasks
from marginlab.training.train import selection_metric

from ..conftest import read_jsonl, read_metrics, run_cli
from ..data.test_retrieval_sets import write_cub, write_inshop

KEYS = ("precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8")
FAST = ["backbone=digits_cnn", "dataset.image_size=28", "dataset.batch_size=4", "dataset.num_workers=0"]
FAST += ["trainer.epochs=2", "logger.tensorboard=false", "logger.figures=false", "logger.progress=false"]


def test_cub_run_logs_the_test_sets_retrieval_metrics_every_epoch(tmp_path, run_train):
    root = write_cub(tmp_path / "cub")
    code, run_dir = run_train("dataset=cub200", f"dataset.root={root}", *FAST)
    assert code == 0
    records = read_jsonl(run_dir)
    assert len(records) == 2
    for record in records:
        for key in KEYS:
            assert 0.0 <= record[f"test/{key}"] <= 1.0, key
    summary = read_metrics(run_dir)
    assert summary["best_metric"] == "epoch" and "test/map_at_r" in summary
    assert "test/MAP@R" in (run_dir / "train.log").read_text()


def test_val_fold_selects_best_pt_on_the_held_out_classes_map_at_r(tmp_path, run_train):
    root = write_cub(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per=3)
    code, run_dir = run_train("dataset=cub200", f"dataset.root={root}", "dataset.val_fold=0", *FAST)
    assert code == 0
    summary = read_metrics(run_dir)
    assert summary["best_metric"] == "val/map_at_r"
    assert {"best/val/map_at_r", "best/test/map_at_r", "best/test/precision_at_1"} <= set(summary)
    assert all("val/precision_at_1" in r and "test/precision_at_1" in r for r in read_jsonl(run_dir))


def test_inshop_queries_search_the_gallery_as_test(tmp_path, run_train):
    root = write_inshop(tmp_path / "inshop")
    code, run_dir = run_train("dataset=inshop", f"dataset.root={root}", *FAST)
    assert code == 0
    record = read_jsonl(run_dir)[-1]
    assert "test/map_at_r" in record and not any(k.startswith(("query/", "gallery/")) for k in record)


def test_a_set_with_nothing_to_retrieve_fails_before_training(tmp_path, run_train, capsys):
    root = write_cub(tmp_path / "cub", classes=(1, 2, 101, 102), per=1)  # one image per test class
    code, _ = run_train("dataset=cub200", f"dataset.root={root}", *FAST)
    assert code == 2
    assert "retrieval set 'test' has no image whose class another image of it shares" in capsys.readouterr().err


def test_run_retrieval_is_the_metrics_of_the_backbones_embedding():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)).train()
    images, labels = torch.randn(20, 3, 2, 2), torch.arange(20) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=6)
    scalars, results = run_retrieval({"test": loader}, backbone, torch.device("cpu"))
    assert backbone.training  # its mode is restored
    with torch.no_grad():
        expected = retrieval_metrics(backbone.eval()(images), labels)
    assert results["test"] == expected
    assert scalars == {f"test/{k}": expected[k] for k in KEYS}


def test_query_and_gallery_pair_up():
    assert tasks(["val", "query", "gallery"]) == [("val", "val", None), ("test", "query", "gallery")]
    with pytest.raises(DataError, match="query set without a gallery"):
        tasks(["query"])


def test_check_retrievable_names_the_set():
    labelled = lambda *y: TensorDataset(torch.zeros(len(y), 1), torch.tensor(y))  # noqa: E731
    check_retrievable({"test": labelled(1, 1, 2)})
    check_retrievable({"query": labelled(1), "gallery": labelled(1, 2)})
    with pytest.raises(DataError, match="'test' has no image whose class another gallery image shares"):
        check_retrievable({"query": labelled(1), "gallery": labelled(2, 2)})


@pytest.mark.parametrize(
    ("best_on", "has_val", "retrieved", "key"),
    [
        ("auto", False, ["val", "test"], "val/map_at_r"),
        ("auto", True, ["val", "test"], "val/acc"),  # a closed-set val split keeps its accuracy
        ("auto", False, ["test"], "epoch"),
        ("val", False, ["val"], "val/map_at_r"),
        ("test", False, ["test"], "test/map_at_r"),
        ("auto", False, [], "epoch"),
    ],
)
def test_selection_on_a_retrieval_set(best_on, has_val, retrieved, key):
    assert selection_metric(best_on, {}, has_val, False, retrieved) == key


def test_best_on_val_without_any_val_set_is_refused():
    with pytest.raises(
        ConfigError, match=r"there is no val split \(set dataset.val_fraction > 0 or dataset.val_fold=0"
    ):
        selection_metric("val", {}, False, False, ["test"])


def test_marginlab_eval_scores_a_runs_retrieval_sets_as_training_did(tmp_path, run_train, capsys):
    root = write_cub(tmp_path / "cub")
    code, run_dir = run_train("dataset=cub200", f"dataset.root={root}", *FAST)
    assert code == 0
    logged = read_metrics(run_dir)
    capsys.readouterr()
    assert run_cli("eval", f"checkpoint={run_dir}", "retrieval=true", "device=cpu") == 0
    out = capsys.readouterr().out
    assert out.startswith("test: P@1 ") and "MAP@R" in out and "R@8" in out
    merged = json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())
    for key in KEYS:  # best.pt is the last epoch: the same weights, the same numbers
        assert merged[f"test/{key}"] == logged[f"test/{key}"], key
    assert merged["results"]["test"]["num_queries"] == 6


def test_marginlab_eval_retrieval_on_a_run_without_retrieval_sets_is_one_line(tmp_path, run_train, capsys):
    code, run_dir = run_train("trainer.epochs=1", "logger.tensorboard=false", "logger.figures=false")
    assert code == 0
    capsys.readouterr()
    assert run_cli("eval", f"checkpoint={run_dir}", "retrieval=true") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "has no retrieval set of unseen classes" in err[0]


def test_marginlab_eval_retrieval_root_points_at_the_moved_set(tmp_path, run_train, capsys):
    root = write_cub(tmp_path / "cub")
    code, run_dir = run_train("dataset=cub200", f"dataset.root={root}", *FAST[:-4], "trainer.epochs=1")
    assert code == 0
    moved = root.rename(tmp_path / "elsewhere")
    assert run_cli("eval", f"checkpoint={run_dir}", "retrieval=true") == 2  # the old root is gone: named
    assert "CUB-200-2011 file" in capsys.readouterr().err
    assert run_cli("eval", f"checkpoint={run_dir}", "retrieval=true", f"retrieval_root={moved}") == 0


def test_a_retrieval_run_resumes_exactly(tmp_path, run_train, monkeypatch):
    """2 epochs straight == 1 epoch + resume 1 epoch, retrieval metrics included: scoring the sets between epochs
    (class-balanced batches, a val fold) leaves the training stream as a resume finds it."""
    root = write_cub(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per=3)
    run = ["dataset=cub200", f"dataset.root={root}", "dataset.val_fold=0", "dataset.samples_per_class=2", *FAST]
    code, straight = run_train(*run)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    assert run_train(*run, "trainer.stop_after_epoch=1")[0] == 0
    assert run_train("resume=latest")[0] == 0
    split = next((tmp_path / "second" / "runs").iterdir())
    times = ("train/images_per_s", "time/epoch_s", "environment")
    rows_a, rows_b = read_jsonl(straight), read_jsonl(split)
    assert [r["epoch"] for r in rows_b] == [1, 2] and "val/map_at_r" in rows_b[1]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in times} == {k: v for k, v in rb.items() if k not in times}


def test_eval_ensemble_joins_the_folds_embeddings(tmp_path, run_train, capsys):
    """ensemble=[...]: the MLRC's concatenated score. A checkpoint joined with itself ranks as it does alone (equal
    normalised halves: the same cosines), so test_concat equals test; another fold's model changes it."""
    root = write_cub(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per=3)
    run = ["dataset=cub200", f"dataset.root={root}", *FAST[:-4], "trainer.epochs=1", "logger=quiet"]
    folds = [run_train(*run, f"dataset.val_fold={fold}")[1] for fold in (0, 1)]
    assert run_cli("eval", f"checkpoint={folds[0]}", "retrieval=true", f"ensemble=[{folds[0]}]") == 0
    merged = json.loads((folds[0] / "checkpoints" / "best.eval.json").read_text())
    assert {f"test_concat/{k}": merged[f"test/{k}"] for k in KEYS} == {k: merged[k] for k in merged if "_concat/" in k}
    assert "val_concat/map_at_r" not in merged  # each fold holds out its own val classes
    assert "test_concat: P@1 " in capsys.readouterr().out
    assert run_cli("eval", f"checkpoint={folds[0]}", "retrieval=true", f"ensemble=[{folds[1]}]") == 0
    record = json.loads((folds[0] / "checkpoints" / "best.eval.json").read_text())
    assert record["results"]["test_concat"]["num_queries"] == 6


def test_eval_ensemble_of_another_data_set_is_refused(tmp_path, run_train, capsys):
    cub = write_cub(tmp_path / "cub", classes=(1, 2, 3, 4, 101, 102), per=3)
    other = write_cub(tmp_path / "cub2", classes=(1, 2, 3, 4, 101, 102), per=3)
    run = [*FAST[:-4], "trainer.epochs=1", "logger=quiet", "dataset=cub200"]
    first, second = (run_train(*run, f"dataset.root={r}")[1] for r in (cub, other))
    capsys.readouterr()
    assert run_cli("eval", f"checkpoint={first}", "retrieval=true", f"ensemble=[{second}]") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "ensemble: " in err[0] and "trained on another data set" in err[0]
    assert run_cli("eval", f"checkpoint={first}", f"ensemble=[{first}]") == 2
    assert "is not allowed without retrieval=true" in capsys.readouterr().err
