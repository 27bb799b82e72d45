"""`marginlab report`: a row per setting (overrides minus seed), mean ± std over seeds, failures, paper values."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from marginlab.cli import main
from marginlab.errors import ConfigError
from marginlab.report import build_report, check_paper, collect, paper_values

PAPER = {
    "source": "L-Softmax (Liu et al., ICML 2016)",
    "table": "CIFAR-10 test error (%)",
    "metric": "test/acc",
    "unit": "error_percent",
    "confidence": "unverified",
    "results": [
        {"match": {"head.m": 1}, "value": 9.05},
        {"match": {"head.m": 4}, "value": 7.58, "confidence": "cited", "evidence": "Some citing paper, Table 3"},
    ],
}


def make_job(
    root: Path,
    m: float,
    seed: int,
    metrics: dict | None,
    num: int,
    head: str = "lsoftmax",
    paper: dict | None = PAPER,
    extra: tuple[str, ...] = ("trainer.epochs=1",),
) -> Path:
    """A job directory as a sweep leaves it: .hydra/{overrides,config,hydra}.yaml and metrics.json."""
    job = root / f"head={head},m={m}" / f"seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"head={head}", f"m={m}", f"seed={seed}", *extra]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": seed, "m": m, "head": {"_target_": "x.LSoftmaxHead", "m": m}, "paper": paper}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {
        "hydra": {
            "job": {"num": num},
            "runtime": {"choices": {"head": head, "regularizer": None, "hydra/launcher": "basic"}},
        }
    }
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    num = 0
    for m, accs in ((1, (0.90, 0.92)), (4, (0.925, 0.915, 0.92)), (2, ())):
        for seed, acc in enumerate(accs):
            make_job(
                root, m, seed, {"status": "completed", "test/acc": acc, "test/loss": acc - 0.5, "lfw/acc": 0.9}, num
            )
            num += 1
    make_job(root, 2, 0, {"status": "failed", "error": "m=2 diverged", "error_type": "TrainingError"}, num)
    make_job(root, 4, 9, None, num + 1)  # a job that died before writing metrics.json
    return root


def test_rows_average_seeds_count_failures_and_mark_the_best(sweep):
    report = build_report(collect([sweep]))
    assert report.keys == ["m"] and report.common == {"head": "lsoftmax", "trainer.epochs": "1"}
    rows = {r.setting["m"]: r for r in report.rows}
    assert [r.setting["m"] for r in report.rows] == ["1", "4", "2"]  # sweep order (hydra.job.num)
    assert len(rows["1"].completed) == 2 and rows["1"].stats["test/acc"].mean == pytest.approx(0.91)
    assert rows["1"].stats["test/acc"].std == pytest.approx(0.0141421, rel=1e-4)  # sample std
    assert len(rows["4"].completed) == 3 and len(rows["4"].failed) == 1  # the job without metrics.json
    assert rows["2"].stats["test/acc"] is None and len(rows["2"].failed) == 1
    assert rows["4"].best and not rows["1"].best
    assert report.metrics == ["test/acc", "lfw/acc"]  # default: test/acc and every <set>/acc


def test_paper_values_sit_beside_ours_with_their_mark(sweep):
    report = build_report(collect([sweep]))
    rows = {r.setting["m"]: r for r in report.rows}
    assert report.paper_labels == ["test err %"]
    ours = rows["4"].ours["test err %"]
    assert ours.mean == pytest.approx(8.0) and rows["4"].paper[0].value == 7.58
    text = report.markdown()
    assert "7.58 [cited]" in text and "9.05 [unverified]" in text and "+0.42" in text
    assert "[unverified] not confirmed" in text and "approximate" in text
    assert rows["2"].paper == []  # no published number for m = 2: the cell stays empty


def test_cli_writes_markdown_and_csv_and_prints_the_table(sweep, capsys):
    assert main(["report", str(sweep), "--metrics", "test/loss,test/acc"]) == 0
    out = capsys.readouterr().out
    assert "| best | m" in out and "test/loss" in out and "failed: " in out and "m=2 diverged" in out
    md = (sweep / "report.md").read_text()
    assert md.splitlines()[0] == out.splitlines()[0]
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    by_m = {r["m"]: r for r in rows}
    assert by_m["1"]["best"] == "1"  # lowest test/loss is best when test/loss comes first
    assert float(by_m["1"]["test/loss mean"]) == pytest.approx(0.41)
    assert by_m["2"]["n"] == "0" and by_m["2"]["failed"] == "1" and "diverged" in by_m["2"]["errors"]
    assert by_m["4"]["paper test err % confidence"] == "cited"
    assert float(by_m["4"]["diff test err %"]) == pytest.approx(0.42)


def test_several_run_dirs_and_out(tmp_path, capsys):
    a = make_job(tmp_path / "runs", 1, 0, {"status": "completed", "test/acc": 0.5}, 0, head="softmax", paper=None)
    b = make_job(tmp_path / "runs", 1, 0, {"status": "completed", "test/acc": 0.7}, 0, head="arcface", paper=None)
    out = tmp_path / "table"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    text = capsys.readouterr().out
    assert "| best | head" in text and "arcface" in text and "0.7000" in text


def test_no_jobs_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no job directories" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_paper_block_checks_and_matching():
    check_paper(PAPER)
    with pytest.raises(ConfigError, match="confidence='maybe'"):
        check_paper({**PAPER, "confidence": "maybe"})
    with pytest.raises(ConfigError, match="unknown keys"):
        check_paper({**PAPER, "reults": []})
    with pytest.raises(ConfigError, match="value"):
        check_paper({**PAPER, "results": [{"match": {}, "value": "high"}]})
    block = {
        "source": "ArcFace",
        "table": "CASIA",
        "unit": "percent",
        "confidence": "repo",
        "evidence": "deepinsight/insightface/README.md",
        "results": [
            {"match": {"head": "arcface"}, "metric": "lfw/acc", "value": 99.53},
            {"match": {"head": "arcface"}, "metric": "cfp_fp/acc", "value": 95.56},
            {"match": {"head": "softmax"}, "metric": "lfw/acc", "value": 99.08},
        ],
    }
    check_paper(block)
    values = paper_values(block, {"head": "arcface"}.get)
    assert [(v.label, v.value) for v in values] == [("lfw/acc %", 99.53), ("cfp_fp/acc %", 95.56)]
    assert values[0].convert(0.995) == pytest.approx(99.5)


def test_a_mark_names_its_evidence():
    with pytest.raises(ConfigError, match="confidence=repo needs evidence"):
        check_paper({**PAPER, "confidence": "repo"})  # the m = 1 entry: repo without a file
    with pytest.raises(ConfigError, match="confidence=repo needs evidence"):
        check_paper({**PAPER, "confidence": "repo", "evidence": "the official repo"})  # no path
    check_paper({**PAPER, "confidence": "repo", "evidence": "wy1iu/LargeMargin_Softmax_Loss/README.md"})
    with pytest.raises(ConfigError, match="confidence=cited needs evidence"):
        check_paper({**PAPER, "results": [{"match": {}, "value": 1.0, "confidence": "cited"}]})
    with pytest.raises(ConfigError, match="compare=3"):
        check_paper({**PAPER, "compare": 3})


def test_compare_reads_ours_from_another_metric(tmp_path):
    """A paper that reports the best epoch (RBF-Softmax's ImageNet table) is compared with best/test/acc."""
    paper = {
        "source": "RBF-Softmax",
        "table": "ImageNet top-1",
        "metric": "test/acc",
        "compare": "best/test/acc",
        "unit": "percent",
        "confidence": "repo",
        "evidence": "2han9x1a0release/RBF-Softmax/docs/IMGS/imagenet_result.png",
        "results": [{"match": {"head": "rbf"}, "value": 77.1}],
    }
    check_paper(paper)
    for seed, (final, best) in enumerate(((0.760, 0.770), (0.764, 0.772))):
        make_job(
            tmp_path / "sweep",
            1,
            seed,
            {"status": "completed", "test/acc": final, "best/test/acc": best},
            seed,
            head="rbf",
            paper=paper,
        )
    report = build_report(collect([tmp_path / "sweep"]))
    (row,) = report.rows
    label = "test/acc % vs best/test/acc"
    assert report.paper_labels == [label] and row.paper[0].measured == "best/test/acc"
    assert row.ours[label].mean == pytest.approx(77.1)  # the best epochs, not the final ones (76.2)
    assert row.stats["test/acc"].mean == pytest.approx(0.762)
    text = report.markdown()
    assert "+0.00" in text and "ours is best/test/acc" in text
    assert "77.1 [repo: 2han9x1a0release/RBF-Softmax/docs/IMGS/imagenet_result.png]" in text


def test_columns_name_their_split_and_the_best_row_is_chosen_on_val(tmp_path):
    """With a validation split the table leads with best/val/acc (it picks the best row), then the test accuracy of
    best.pt and of the last epoch, each header saying which split and which epoch it is."""
    runs = {1: (0.95, 0.90, 0.91), 4: (0.93, 0.94, 0.92)}  # m: (best val, test at best val, last test)
    for num, (m, (val, best_test, test)) in enumerate(runs.items()):
        make_job(
            tmp_path / "sweep",
            m,
            0,
            {
                "status": "completed",
                "best_metric": "val/acc",
                "best/val/acc": val,
                "best/test/acc": best_test,
                "test/acc": test,
                "val/acc": val,
            },
            num,
        )
    report = build_report(collect([tmp_path / "sweep"]))
    assert report.metrics == ["best/val/acc", "best/test/acc", "test/acc"] and report.selected_on == "val/acc"
    header = report.markdown().splitlines()[0]
    assert "| val/acc (best) " in header and "| test/acc @ best val " in header and "| test/acc (last epoch) " in header
    assert [r.setting["m"] for r in report.rows if r.best] == ["1"]  # the higher val/acc, not the higher test/acc
    assert "splits: val = held out of the training images" in report.markdown()
    assert "optimistic" not in report.markdown()


def test_a_choice_on_the_test_split_is_labelled_optimistic(tmp_path):
    make_job(
        tmp_path / "sweep",
        1,
        0,
        {"status": "completed", "best_metric": "test/acc", "best/test/acc": 0.9, "test/acc": 0.8},
        0,
    )
    report = build_report(collect([tmp_path / "sweep"]), ["best/test/acc", "test/acc"])
    assert report.markdown().splitlines()[0].count("test/acc (best) (optimistic: chosen on test)") == 1
    assert "best.pt: chosen on test/acc" in report.markdown() and "overstates" in report.markdown()
    assert build_report(collect([tmp_path / "sweep"])).metrics == ["test/acc"]  # no val split: the final test/acc


def make_run(
    root: Path,
    name: str,
    overrides: list[str],
    head: str,
    m: float,
    seed: int = 0,
    workers: int = 2,
    logger: str = "default",
    metrics: dict | None = None,
) -> Path:
    """A single run's directory (``marginlab train``, no sweep): hydra.job.num is ??? there."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {
        "seed": seed,
        "m": None,
        "name": None,
        "head": {"_target_": f"x.{head}", "m": m, "s": 30.0},
        "dataset": {"_target_": "x.Digits", "num_workers": workers, "batch_size": 64, "seed": seed},
        "logger": {"tensorboard": logger == "default"},
        "trainer": {"epochs": 3, "device": "auto"},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"head": head, "dataset": "digits", "logger": logger, "hydra/launcher": "basic"}
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"job": {"num": "???"}, "runtime": {"choices": choices}}})
    )
    (run / "metrics.json").write_text(json.dumps(metrics or {"status": "completed", "test/acc": 0.9 + m / 10}))
    if (metrics or {}).get("status", "completed") == "completed":
        (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return run


def test_runs_without_overrides_are_labelled_by_what_differs_in_their_saved_configs(tmp_path, capsys):
    make_run(tmp_path, "a", ["head=arcface"], "arcface", 0.5, workers=0, logger="quiet")
    make_run(tmp_path, "b", [], "amsoftmax", 0.35, seed=0)
    make_run(tmp_path, "c", [], "amsoftmax", 0.35, seed=1, workers=8)  # another seed of b's setting
    make_run(tmp_path, "d", [], "amsoftmax", 0.2)  # same overrides as b, another margin in its config
    report = build_report(collect([tmp_path]))
    # not dataset.num_workers, logger, the seed (nor dataset.seed, the seed by interpolation); head.s is the same
    assert report.keys == ["head", "head.m"]
    labels = {tuple(report.cells(r)[1:3]): len(r.completed) for r in report.rows}
    assert labels == {("arcface", "0.5"): 1, ("amsoftmax", "0.35"): 2, ("amsoftmax", "0.2"): 1}
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| best | head      | head.m |" in out and "num_workers" not in out.split("\n\n")[0]


def test_runs_that_never_trained_are_skipped_with_a_count(tmp_path, capsys):
    make_run(tmp_path, "ok", [], "arcface", 0.5)
    failed = {"status": "failed", "error": "optim.lr='abc' is not allowed", "error_type": "ConfigError"}
    make_run(tmp_path, "bad1", ["optim.lr=abc"], "arcface", 0.5, metrics=failed)
    make_run(tmp_path, "bad2", ["optim.lr=x"], "arcface", 0.5, metrics=failed)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 run dirs that never trained" in out and "report of 1 jobs in 1 rows" in out
    assert "optim.lr" not in out.split("skipped")[1]  # no row, column or failure note of theirs
    (tmp_path / "ok" / "metrics.json").write_text(json.dumps(failed))
    (tmp_path / "ok" / "metrics.jsonl").unlink()  # now it never trained either
    assert main(["report", str(tmp_path)]) == 2
    assert "except 3 that never trained" in capsys.readouterr().err
