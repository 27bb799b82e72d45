"""`marginlab report`: a row per differing setting, mean ± CI over seeds, tests against the best, paper values."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from marginlab.commands.cli import main
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
    assert report.keys == ["head.m"] and report.common == {"head": "lsoftmax", "trainer.epochs": "1"}
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
    assert "| best | head.m" in out and "test/loss" in out and "failed: " in out and "m=2 diverged" in out
    md = (sweep / "report.md").read_text()
    assert md.splitlines()[0] == out.splitlines()[0]
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    by_m = {r["head.m"]: r for r in rows}
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


# ---------------------------------------------------------------- settings: every difference shown, none misstated
HEADS = {  # each head's config as a run saves it (resolved; the shorthand s= / m= written into head.s / head.m)
    "cosface": {"_target_": "marginlab.heads.amsoftmax.AMSoftmaxHead", "s": 64.0, "m": 0.35, "init": "official"},
    "arcface": {
        "_target_": "marginlab.heads.arcface.ArcFaceHead",
        "s": 64.0,
        "m": 0.5,
        "easy_margin": False,
        "mode": "exact",
        "init": "official",
    },
    "sphereface": {
        "_target_": "marginlab.heads.sphereface.SphereFaceHead",
        "m": 4,
        "base": 1000.0,
        "gamma": 0.12,
        "lambda_min": 5.0,
        "mode": "exact",
        "init": "official",
    },
}
ENV = {"torch_threads": 1, "torch": "2.5.1", "cuda": None, "device": "cpu", "marginlab": "0.1.0", "git_commit": None}


def real_job(
    root: Path,
    head: str,
    overrides: list[str],
    seed: int,
    acc: float,
    num: int | None = 0,
    set_: dict | None = None,
    environment: dict | None = ENV,
) -> Path:
    """A job directory as `marginlab train` writes it: overrides.yaml (the command line), config.yaml (resolved),
    hydra.yaml (the group choices, the job's number in its sweep) and metrics.json (with its environment record).
    ``set_``: dotted config keys to change, as the overrides would."""
    name = ",".join(o for o in overrides if not o.startswith("seed=")) or "defaults"
    job = root / f"{name}-{num}" / f"seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    config = {
        "seed": seed,
        "m": None,
        "s": None,
        "name": None,
        "trainer": {"epochs": 15, "device": "auto", "precision": "auto", "checkpoint": False, "grad_clip": 1.0},
        "logger": {"tensorboard": False},
        "backbone": {"_target_": "marginlab.backbones.lenet_pp.LeNetPP", "embedding_dim": 2},
        "head": dict(HEADS[head]),
        "dataset": {
            "_target_": "marginlab.data.digits.DigitsData",
            "batch_size": 64,
            "seed": seed,
            "val_fraction": 0.1,
        },
        "optim": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        "regularizer": {},
        "paper": None,
        "reproduce": {"sweeps": [{"head": "softmax"}], "plot": True},
    }
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("s", "m"):
            config[key] = config["head"][key] = float(value)
        elif key.startswith("head."):
            config["head"][key[5:]] = yaml.safe_load(value)
    for key, value in (set_ or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"experiment": "digits_2d_comparison", "head": head, "dataset": "digits", "backbone": "lenet_pp"}
    choices |= {"optim": "sgd", "regularizer": None, "hydra/launcher": "basic"}
    hydra = {"hydra": {"job": {"num": "???" if num is None else num}, "runtime": {"choices": choices}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    record = {"status": "completed", "epochs_done": config["trainer"]["epochs"], "test/acc": acc}
    if environment is not None:
        record["environment"] = environment
    (job / "metrics.json").write_text(json.dumps(record))
    (job / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return job


def three_sweeps(root: Path) -> Path:
    """`-m experiment=digits_2d_comparison head=cosface s=10 m=0.1 seed=0,1`, then `head=arcface s=10 m=0.2`, then
    `head=sphereface head.gamma=0.5`, all into one sweep dir."""
    exp = "experiment=digits_2d_comparison"
    for num, seed in enumerate((0, 1)):
        real_job(root, "cosface", [exp, "head=cosface", "s=10", "m=0.1"], seed, 0.95 + seed / 100, num)
    real_job(root, "arcface", [exp, "head=arcface", "s=10", "m=0.2"], 0, 0.97, 0)
    real_job(root, "sphereface", [exp, "head=sphereface", "head.gamma=0.5"], 0, 0.93, 0)
    return root


def md_rows(text: str) -> dict[str, list[str]]:
    """The markdown table's rows by their head column."""
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("\n\n")[0].splitlines()]
    header = lines[0]
    return {row[header.index("head")]: dict(zip(header, row)) for row in lines[2:]}


def test_three_sweeps_into_one_dir_show_each_heads_own_s_and_m_and_a_true_common_line(tmp_path, capsys):
    root = three_sweeps(tmp_path / "sweep")
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    rows = md_rows(out)
    assert [rows[h]["head.s"] for h in ("cosface", "arcface", "sphereface")] == ["10", "10", "-"]
    assert [rows[h]["head.m"] for h in ("cosface", "arcface", "sphereface")] == ["0.1", "0.2", "4"]
    assert [rows[h]["head.gamma"] for h in ("cosface", "arcface", "sphereface")] == ["-", "-", "0.5"]
    (common,) = [line for line in out.splitlines() if line.startswith("- common to every run: ")]
    assert "experiment=digits_2d_comparison" in common and "trainer.epochs=15" in common
    assert " s=" not in common and " m=" not in common and "head.m" not in common  # true of SphereFace too
    tex = (root / "report.tex").read_text()
    assert r"ArcFace ($s$=10, $m$=0.2)" in tex and r"SphereFace ($m$=4, head.gamma=0.5)" in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\mathbf{0.9700}" in tex  # arcface: best, bold
    with open(root / "report.csv") as f:
        csv_rows = {r["head"]: r for r in csv.DictReader(f)}
    cos = csv_rows["cosface"]
    assert int(cos["test/acc n"]) == 2 and float(cos["test/acc std"]) == pytest.approx(0.00707107, rel=1e-5)
    half = 12.7062047 * 0.00707107 / 2**0.5  # t_{0.975, 1} s / sqrt(n)
    assert float(cos["test/acc ci_low"]) == pytest.approx(0.955 - half, rel=1e-5)
    assert float(cos["test/acc ci_high"]) == pytest.approx(0.955 + half, rel=1e-5)
    assert csv_rows["arcface"]["best"] == "1" and csv_rows["arcface"]["test/acc ci_low"] == ""  # one seed


def test_defaults_of_the_heads_are_shown_not_only_what_was_typed(tmp_path):
    real_job(tmp_path, "arcface", ["head=arcface"], 0, 0.9, None)
    real_job(tmp_path, "cosface", ["head=cosface"], 0, 0.9, None)
    report = build_report(collect([tmp_path]))
    assert report.keys == ["head", "head.m"] and report.common["head.s"] == "64"
    assert {r.setting["head"]: r.setting["head.m"] for r in report.rows} == {"arcface": "0.5", "cosface": "0.35"}
    real_job(tmp_path, "sphereface", ["head=sphereface"], 0, 0.9, None)
    report = build_report(collect([tmp_path]))
    assert report.keys == ["head", "head.s", "head.m"] and "head.s" not in report.common


def mixed_runs(tmp_path: Path, a_set: dict | None = None, **changed) -> tuple[Path, Path]:
    a = real_job(tmp_path / "a", "arcface", ["head=arcface"], 0, 0.9972, None, set_=a_set)
    b = real_job(tmp_path / "b", "cosface", ["head=cosface"], 0, 0.2083, None, **changed)
    return a, b


def test_runs_of_different_length_are_refused_unless_allowed_and_then_marked_mixed(tmp_path, capsys):
    a, b = mixed_runs(tmp_path, set_={"trainer.epochs": 2})
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differ in trainer.epochs: 15 (" in err and "2 (" in err
    assert "--allow-mixed" in err and not (tmp_path / "t").exists()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "t"), "--allow-mixed"]) == 0
    md = (tmp_path / "t" / "report.md").read_text()
    assert "| trainer.epochs* |" in md.splitlines()[0] and "MIXED (--allow-mixed)" in md
    with open(tmp_path / "t" / "report.csv") as f:
        assert {r["head"]: r["mixed"] for r in csv.DictReader(f)} == {
            "arcface": "trainer.epochs=15",
            "cosface": "trainer.epochs=2",
        }
    assert "Mixed settings" in (tmp_path / "t" / "report.tex").read_text()


@pytest.mark.parametrize(
    "changed, key",
    [
        ({"set_": {"optim.lr": 0.5}}, "optim.lr"),
        ({"set_": {"dataset.root": "/data/glint.rec"}, "a_set": {"dataset.root": "/data/casia.rec"}}, "dataset.root"),
        ({"set_": {"trainer.num_threads": 4}, "a_set": {"trainer.num_threads": 1}}, "trainer.num_threads"),
        ({"environment": {**ENV, "torch_threads": 8}}, "environment.torch_threads"),
        ({"environment": {**ENV, "marginlab": "0.2.0"}}, "environment.marginlab"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_difference_that_is_not_compared_is_named(tmp_path, capsys, changed, key):
    a, b = mixed_runs(tmp_path, **changed)
    assert main(["report", str(a), str(b)]) == 2
    assert f"differ in {key}: " in capsys.readouterr().err


def test_unknown_is_not_a_difference_and_a_declared_axis_is_a_column(tmp_path, capsys):
    # an older run without the environment record (or trainer.num_threads): unknown, not mixed
    a, b = mixed_runs(tmp_path, environment=None, set_={"trainer.num_threads": 2})
    report = build_report(collect([a, b]))
    assert not report.mixed and report.keys == ["head", "head.m"]
    a, b = mixed_runs(tmp_path / "raw", set_={"dataset.seed": "${seed}"})  # saved unresolved: never resolved here
    assert not build_report(collect([a, b])).mixed
    a, b = mixed_runs(tmp_path / "lr", set_={"optim.lr": 0.5})
    assert main(["report", str(a), str(b), "--axis", "optim.lr"]) == 0
    out = capsys.readouterr().out
    assert "| optim.lr |" in out.splitlines()[0] and "MIXED" not in out
    for job in (a, b):  # an Optuna search over optim.lr records its space in hydra.sweeper.params: an axis too
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["sweeper"] = {"params": {"optim.lr": "interval(0.01, 1.0)"}}
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    report = build_report(collect([a, b]))
    assert not report.mixed and "optim.lr" in report.keys


def test_runs_on_different_data_roots_are_two_settings_not_a_duplicate(tmp_path):
    a = real_job(tmp_path / "a", "arcface", [], 0, 0.9, None, set_={"dataset.root": "/data/casia.rec"})
    b = real_job(tmp_path / "b", "arcface", [], 0, 0.5, None, set_={"dataset.root": "/data/glint.rec"})
    report = build_report(collect([a, b]))
    assert report.confounders == ["dataset.root"] and len(report.rows) == 2
    assert not [n for n in report.notes() if n.startswith("duplicate")]


def test_a_malformed_run_file_is_one_line_naming_it(tmp_path, capsys):
    a = real_job(tmp_path, "arcface", ["head=arcface"], 0, 0.9, None)
    (a / ".hydra" / "config.yaml").write_text("head: [unclosed\n")
    assert main(["report", str(tmp_path)]) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert ".hydra/config.yaml: not readable YAML" in note


# ---------------------------------------------------------------- statistics
def test_interval_and_tests_match_scipy_on_known_data():
    from scipy import stats as sp

    from marginlab.report.stats import holm, paired_p, paired_power, seeds_needed, summarize, welch_p

    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.915, 0.921, 0.93]
    s = summarize(a)
    assert (s.mean, s.n) == (pytest.approx(0.9275), 4) and s.std == pytest.approx(0.0170783, rel=1e-5)
    assert (s.ci_low, s.ci_high) == pytest.approx(sp.t.interval(0.95, 3, loc=0.9275, scale=sp.sem(a)))
    assert s.ci_high - s.mean == pytest.approx(3.182446 * 0.0170783 / 2, rel=1e-5)  # t_{0.975, 3} s / sqrt(4)
    assert paired_p(a, b) == pytest.approx(sp.ttest_rel(a, b).pvalue) == pytest.approx(0.0917211, rel=1e-5)
    assert welch_p(a, b[:3]) == pytest.approx(sp.ttest_ind(a, b[:3], equal_var=False).pvalue)
    assert paired_p([1.0, 2.0], [0.0, 1.0]) == 0.0 and paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0  # no noise
    assert paired_p([1.0], [0.0]) is None and welch_p([1.0], [0.0, 1.0]) is None
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x .01; max(2 x .03, 1 x .04)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    # power of the paired t-test: effect size 1 needs 10 pairs (0.803), 9 are not enough (0.748); d = 0.5: 34
    assert paired_power(10, 1.0, 1.0) == pytest.approx(0.8031, abs=1e-4) and paired_power(9, 1.0, 1.0) < 0.8
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(0.5, 1.0) == 34 and seeds_needed(1e-6, 1.0) is None


def paired_sweep(root: Path) -> list:
    """Three heads on the same seeds 0..3: arcface best, cosface a hair below on every seed, sphereface far below."""
    accs = {"arcface": (0.950, 0.960, 0.955, 0.965), "cosface": (0.949, 0.958, 0.955, 0.962), "sphereface": None}
    accs["sphereface"] = (0.90, 0.91, 0.92, 0.905)
    for num, (head, values) in enumerate(accs.items()):
        for seed, acc in enumerate(values):
            real_job(root, head, [f"head={head}"], seed, acc, num)
    return [accs[h] for h in ("cosface", "sphereface", "arcface")]


def test_rows_are_tested_against_the_best_paired_on_seeds_with_holm(tmp_path):
    from scipy import stats as sp

    cos, sphere, arc = paired_sweep(tmp_path)
    report = build_report(collect([tmp_path]), alpha=0.05)
    rows = {r.setting["head"]: r for r in report.rows}
    assert rows["arcface"].best and rows["arcface"].vs_best is None
    p_cos, p_sphere = sp.ttest_rel(cos, arc).pvalue, sp.ttest_rel(sphere, arc).pvalue
    assert rows["cosface"].vs_best.test == "paired" and rows["cosface"].vs_best.p == pytest.approx(p_cos)
    low, high = sorted((p_cos, p_sphere))
    holm_p = {p: min(1, 2 * low) if p == low else min(1, max(2 * low, high)) for p in (p_cos, p_sphere)}
    assert rows["cosface"].vs_best.p_holm == pytest.approx(holm_p[p_cos])
    assert rows["sphereface"].vs_best.p_holm == pytest.approx(holm_p[p_sphere])
    assert holm_p[p_cos] >= 0.05 > holm_p[p_sphere]  # the data: cosface not distinguishable, sphereface worse
    assert rows["cosface"].tie and not rows["sphereface"].tie
    strict = build_report(collect([tmp_path]), alpha=1e-9)  # --alpha: at this level sphereface is not shown worse
    assert all(r.tie for r in strict.rows if not r.best)
    assert "alpha = 1e-09" in strict.markdown() and "its 99.9999999% confidence interval" in strict.markdown()
    md = report.markdown()
    assert md.splitlines()[2].startswith("| best ") and md.splitlines()[3].startswith("| †    | cosface")
    assert "paired t-test on the seeds both rows ran" in md and "Holm-adjusted over 2 comparison(s)" in md
    sd = sp.tstd([c - a for c, a in zip(cos, arc)])
    from marginlab.report.stats import seeds_needed

    assert rows["cosface"].vs_best.seeds_needed == seeds_needed(0.005, sd, 0.05)
    assert f"head=cosface, head.s=64, head.m=0.35: {seeds_needed(0.005, sd, 0.05)}" in md
    assert "=-" not in md and "head=sphereface, head.m=4: " in md  # named by the settings it has, not head.s=-
    assert report.p_cell(rows["cosface"]) == f"{holm_p[p_cos]:.3g}"  # no W: paired
    # seed 3 of cosface lost: not the same seeds any more, so Welch, and said so
    report = build_report([j for j in collect([tmp_path]) if not (j.text("head") == "cosface" and j.seed == 3)])
    rows = {r.setting["head"]: r for r in report.rows}
    assert rows["cosface"].vs_best.test == "Welch"
    assert rows["cosface"].vs_best.p == pytest.approx(sp.ttest_ind(cos[:3], arc, equal_var=False).pvalue)
    assert report.p_cell(rows["cosface"]).endswith(" W") and "Welch's t-test" in report.markdown()


def test_verification_metrics_say_how_folds_and_seeds_combine(tmp_path):
    for seed, acc in enumerate((0.99, 0.985)):
        job = real_job(tmp_path, "arcface", [], seed, 0.9, 0)
        record = json.loads((job / "metrics.json").read_text()) | {"lfw/acc": acc, "lfw/acc_std": 0.01}
        (job / "metrics.json").write_text(json.dumps(record))
    report = build_report(collect([tmp_path]))
    assert report.metrics == ["test/acc", "lfw/acc"] and report.rows[0].stats["lfw/acc"].n == 2  # seeds, not folds
    assert any(n.startswith("lfw/acc: per seed, the mean accuracy over its verification folds") for n in report.notes())


def test_report_options_are_checked(tmp_path, capsys):
    three_sweeps(tmp_path)
    assert main(["report", str(tmp_path), "--alpha", "1.5"]) == 2
    assert "--alpha=1.5 is not allowed" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--detect", "0"]) == 2


def test_latex_escapes_everything_a_run_directory_can_hold():
    from marginlab.report.latex import escape

    assert escape("a&b%c$d#e_f{g}h~i^j\\k") == (
        r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )
    assert escape("[x] <y> |z| ±†") == r"{[}x{]} \textless{}y\textgreater{} \textbar{}z\textbar{} $\pm$$^\dagger$"
