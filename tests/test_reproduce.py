"""`marginlab reproduce`: every job of every experiment's sweeps composes, validates and takes one optimizer step;
the command runs the sweeps into one sweep dir, then the report (and plot), with the exit code of the scripts it
replaces; the docs name commands that exist; the top-level ``m=`` shorthand reaches integer margins.

Each experiment's ``reproduce.sweeps`` are expanded by Hydra's own basic sweeper into every override combination.
Jobs that differ only in ``seed`` share one config, so one of them is stepped. The step uses the building blocks
of ``marginlab train`` (validate, builders.build_model / build_optimizer / build_scheduler, the model's criterion)
on two generated images of the data set's channels and class count, at a small image size for the 112-224 pixel
nets: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import marginlab
import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab.commands import reproduce
from marginlab.commands.cli import main
from marginlab.config.validate import import_target, validate
from marginlab.data.face import parse_image_size
from marginlab.environment import kept_threads
from marginlab.errors import ConfigError, TrainingError
from marginlab.losses import criterion_for
from marginlab.training import builders

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = Path(marginlab.__file__).parent / "configs" / "experiment"
NAMES = reproduce.experiment_names()
#: CPU, float32, no checkpoint, quiet: the parts of a run these tests do not exercise
FAST = [
    "trainer.device=cpu",
    "trainer.precision=32",
    "trainer.compile=false",
    "trainer.checkpoint=false",
    "logger=quiet",
]
#: the published class counts of the data sets whose count is read from the data (CASIA-WebFace, ImageNet)
NUM_CLASSES = {"CasiaData": 10572, "ImageNetData": 1000, "DigitsRetrievalData": 5}
# the retrieval sets' training classes less the val fold of the MLRC experiments (a quarter of them held out)
NUM_CLASSES |= {"CUB200Data": 75, "Cars196Data": 73, "SOPData": 8488, "InShopData": 2997}


@functools.cache
def specs() -> dict[str, reproduce.Spec]:
    """Every experiment's ``reproduce:`` block, composed once for the module."""
    return dict(zip(NAMES, reproduce.read_specs(NAMES)))


def experiment_jobs(name: str) -> list[list[str]]:
    """Every job of every sweep of ``marginlab reproduce <name>``, as its overrides."""
    return [job for sweep in specs()[name].sweeps for job in reproduce.expand(sweep)]


def distinct_settings(jobs: list[list[str]]) -> list[list[str]]:
    """One job per setting: jobs that differ only in the seed compose the same config."""
    seen, out = set(), []
    for job in jobs:
        key = tuple(sorted(o for o in job if not o.startswith("seed=")))
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


@contextlib.contextmanager
def hydra_configs():
    """Hydra initialised on marginlab's configs (once for many compositions)."""
    from hydra import initialize_config_module

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        yield


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose

    return hydra_compose("train", overrides=[*overrides, *FAST])


def small_shape(cfg) -> tuple[int, int | tuple[int, int], int]:
    """(channels, image size, classes) of the job's data set, its images shrunk to 16 pixels high (aspect ratio
    kept; every backbone sizes its last layers from the input): a step costs little even for SphereFace-64."""
    cls = import_target(cfg.dataset._target_, "dataset")
    h, w = parse_image_size(cfg.dataset.get("image_size", None) or cls.image_size)
    if h > 16:
        h, w = 16, max(1, round(16 * w / h))
    num_classes = NUM_CLASSES.get(cls.__name__) or cls.num_classes
    assert isinstance(num_classes, int), f"{cls.__name__}: no class count for the generated data"
    return int(cls.in_channels), (h if h == w else (h, w)), num_classes


def one_step(overrides: list[str]) -> float:
    """Compose, validate and build the job as `marginlab train` does, then one optimizer step on two images."""
    cfg = compose(overrides)
    head = validate(cfg)
    builders.build_verifiers(cfg.get("verification"))  # lazy: checks the nodes, reads nothing
    in_channels, image_size, num_classes = small_shape(cfg)
    torch.manual_seed(0)
    model = builders.build_model(cfg, in_channels, image_size, num_classes, head=head)
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg, optimizer, steps_per_epoch=1)
    h, w = parse_image_size(image_size)
    images, labels = torch.randn(2, in_channels, h, w), torch.tensor([0, num_classes - 1])
    model.train()
    embeddings, logits = model(images, labels)
    loss = criterion_for(model).from_head_output(embeddings, logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


# ---------------------------------------------------------------- every job of every sweep
def test_the_sweeps_expand_into_every_job():
    jobs = experiment_jobs("digits_2d_comparison")
    assert len(jobs) == 15 * 3  # 15 settings x 3 seeds: fourteen sweeps, every combination
    assert ["experiment=digits_2d_comparison", "head=arcface", "s=10", "m=0.2", "seed=2"] in jobs
    assert ["experiment=digits_2d_comparison", "head=rbf", "seed=0"] in jobs
    sphereface = experiment_jobs("sphereface_casia")  # the released model's 5 runs + the effect-of-m table
    assert [j for j in sphereface if "m=3" in j] == [["experiment=sphereface_casia", "backbone=sfnet64", "m=3"]]
    assert ["experiment=sphereface_casia", "backbone=sfnet64", "head=softmax", "~head.mode=null"] in sphereface
    assert len(sphereface) == 5 + 5
    center = distinct_settings(experiment_jobs("center_casia"))  # softmax alone runs another experiment's recipe
    assert center == [["experiment=center_casia", "seed=0"], ["experiment=amsoftmax_casia", "head=softmax", "seed=0"]]
    # the shipped tables keep their size: as many jobs as the scripts/*.sh that ran them
    assert {
        n: len(experiment_jobs(n))
        for n in ("amsoftmax_casia", "arcface_casia", "normface_casia", "lsoftmax_mnist", "rbf_mnist_2d")
    } == {"amsoftmax_casia": 10, "arcface_casia": 5, "normface_casia": 4, "lsoftmax_mnist": 12, "rbf_mnist_2d": 12}


@pytest.fixture
def cheap_steps(monkeypatch):
    """One thread (these tiny steps run several times slower on two busy cores than on one), and jobs of one
    experiment with the same backbone node and input share one backbone instance, reset to its initial weights
    for each job: building a 40M parameter net again for every head of a sweep would double the test's time
    and check nothing more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built: dict[str, tuple[torch.nn.Module, dict]] = {}
    instantiate = builders._instantiate

    def cached(node, key, **kwargs):
        if key != "backbone":
            return instantiate(node, key, **kwargs)
        ident = OmegaConf.to_yaml(node) + repr(sorted(kwargs.items()))
        if ident not in built:
            net = instantiate(node, key, **kwargs)
            built[ident] = net, {k: v.clone() for k, v in net.state_dict().items()}
        net, initial = built[ident]
        net.load_state_dict(initial)
        return net

    monkeypatch.setattr(builders, "_instantiate", cached)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_every_job_of_the_experiment_takes_a_training_step(name, cheap_steps):
    jobs = experiment_jobs(name)
    assert jobs, f"experiment={name} runs no job"
    with hydra_configs():
        for job in distinct_settings(jobs):
            try:
                loss = one_step(job)
            except Exception as exc:  # name the job: an experiment's sweeps have many
                raise AssertionError(f"experiment={name}: `marginlab train -m {' '.join(job)}` fails: {exc}") from exc
            assert math.isfinite(loss), f"experiment={name}: {' '.join(job)}: loss {loss}"


# ---------------------------------------------------------------- the docs name commands that exist
def test_experiment_comments_name_commands_that_exist():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
        assert "scripts/" not in comments, f"experiment={path.stem} points to a script; scripts/ is gone"
        assert f"marginlab reproduce {path.stem} " in comments, f"experiment={path.stem} names no reproduce command"
        for name, sweeps in re.findall(r"marginlab reproduce (\w+)(?: --sweeps ([\d,]+))?", comments):
            assert name in NAMES, f"experiment={path.stem} names `marginlab reproduce {name}`: no such experiment"
            count = len(specs()[name].sweeps)
            assert all(1 <= int(i) <= count for i in sweeps.split(",") if i), (path.stem, name, sweeps)


def test_the_readme_and_the_docs_name_commands_that_exist():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for script in re.findall(r"scripts/[\w./-]+", text):
            assert (ROOT / script).exists(), f"{page.name} names {script}, which does not exist"
        named = re.findall(r"marginlab reproduce (\w+)", text)
        unknown = set(named) - set(NAMES)
        assert not unknown, f"{page.name} names experiments that do not exist: {unknown}"
    assert "marginlab reproduce digits_2d_comparison" in (ROOT / "docs" / "sweeps.md").read_text()
    # one generic script remains: it takes the experiment's name and runs `marginlab reproduce`
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.sh"))
    assert scripts == ["reproduce.sh"], f"per-experiment scripts are replaced by marginlab reproduce <name>: {scripts}"
    assert 'reproduce "$@"' in (ROOT / "scripts" / "reproduce.sh").read_text()


# ---------------------------------------------------------------- the reproduce: block
@pytest.mark.parametrize(
    "block, message",
    [
        (None, "reproduce.sweeps is missing"),
        ({"sweeps": []}, "reproduce.sweeps is missing"),
        ({"sweeps": [{"m": "1,2"}], "plots": True}, "unknown keys ['plots']; allowed: sweeps, plot"),
        ({"sweeps": {"m": "1,2"}}, "reproduce.sweeps must be a list of mappings"),
        ({"sweeps": ["m=1,2"]}, "reproduce.sweeps[0] must be a mapping of override keys to values"),
        ({"sweeps": [{"m": "1,2"}, {}]}, "reproduce.sweeps[1] must be a mapping"),
        ({"sweeps": [{"head": {"m": 1}}]}, "reproduce.sweeps[0]: 'head' is not allowed"),
        ({"sweeps": [{"experiment": "nope"}]}, "reproduce.sweeps[0]: experiment='nope' does not exist"),
        ({"sweeps": [{"seed": "0,1"}], "plot": "yes"}, "reproduce.plot='yes' is not allowed: give true or false"),
        ({"sweeps": [{"seed": "0,1"}], "num_threads": 1}, "(the thread count is trainer.num_threads"),
    ],
)
def test_a_bad_reproduce_block_is_refused_naming_the_key(block, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        reproduce.spec_of("lsoftmax_mnist", block)


def test_a_sweep_entry_becomes_hydra_overrides():
    spec = reproduce.spec_of(
        "x",
        {
            "sweeps": [
                {
                    "experiment": "lsoftmax_mnist",
                    "m": "1,2",
                    "head.m2": 0.0,
                    "~head.mode": None,
                    "trainer.compile": True,
                    "verification": ["lfw"],
                    "regularizer": None,
                }
            ]
        },
    )
    assert spec.sweeps == [
        [
            "experiment=lsoftmax_mnist",
            "m=1,2",
            "head.m2=0.0",
            "~head.mode",
            "trainer.compile=true",
            "verification=[lfw]",
            "regularizer=null",
        ]
    ]


# ---------------------------------------------------------------- the command
@pytest.fixture
def recorded(monkeypatch):
    """Jobs are not composed before the recorded commands run (tested on its own below): they cost ~0.3 s each."""
    monkeypatch.setattr(reproduce, "check_jobs", lambda commands: None)


class Recorder:
    """The CLI's commands, recorded: ``train`` returns the next of ``codes``; ``report`` may raise."""

    def __init__(self, *codes: int, report_error: Exception | None = None):
        self.calls: list[tuple[str, list[str]]] = []
        self.codes, self.report_error = list(codes), report_error
        self.commands = {"train": self.train, "report": self.report, "plot": self.plot}

    def train(self, args):
        self.calls.append(("train", args))
        return self.codes.pop(0) if self.codes else 0

    def report(self, args):
        self.calls.append(("report", args))
        if self.report_error:
            raise self.report_error
        return 0

    def plot(self, args):
        self.calls.append(("plot", args))
        return 0


def test_reproduce_runs_every_sweep_into_one_dir_then_the_report_and_the_plot(outputs_dir, recorded, capsys):
    rec = Recorder()
    assert reproduce.main(["rbf_mnist_2d", "trainer.epochs=1", "seed=0"], rec.commands) == 0
    (sweep_dir,) = (outputs_dir / "sweeps" / "rbf_mnist_2d").iterdir()
    where = f"hydra.sweep.dir={sweep_dir}"
    assert rec.calls == [
        (
            "train",
            [
                "-m",
                "experiment=rbf_mnist_2d",
                "head=softmax,normface,rbf",
                "seed=0,1,2",
                "trainer.epochs=1",
                "seed=0",
                where,
            ],
        ),
        (
            "train",
            [
                "-m",
                "experiment=rbf_mnist_2d",
                "head=softmax",
                "regularizer=center",
                "seed=0,1,2",
                "trainer.epochs=1",
                "seed=0",
                where,
            ],
        ),
        ("report", [str(sweep_dir)]),
        ("plot", [str(sweep_dir)]),
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", sweep_dir.name)

    rec = Recorder()  # --sweeps picks some; no plot for a table without figures
    assert reproduce.main(["sphereface_casia", "--sweeps", "3,2"], rec.commands) == 0
    assert [c[1][1:4] for c in rec.calls if c[0] == "train"] == [
        ["experiment=sphereface_casia", "backbone=sfnet64", "m=1,2,3,4"],
        ["experiment=sphereface_casia", "backbone=sfnet64", "head=softmax"],
    ]
    assert [c[0] for c in rec.calls] == ["train", "train", "report"]
    # the experiment compares backbones on purpose (sfnet64 beside its default): the report is told, not refused
    assert rec.calls[-1][1][1:] == ["--axis", "backbone"]


def test_reproduce_and_train_m_run_a_job_with_the_same_thread_count(outputs_dir, recorded):
    """Issue #23: one ArcFace job gave 0.9611 under reproduce (which set one thread around its sweeps) and 0.9361
    under train -m (two). Now reproduce leaves torch's count alone and the job sets its own from the experiment's
    trainer.num_threads, composed the same both ways."""
    threads: list[int] = []
    rec = Recorder()
    rec.commands["train"] = lambda args: threads.append(torch.get_num_threads()) or rec.train(args)
    with kept_threads():
        torch.set_num_threads(2)
        assert reproduce.main(["digits_2d_comparison", "--sweeps", "6", "seed=0"], rec.commands) == 0
    assert threads == [2]
    (job,) = reproduce.expand([a for a in rec.calls[0][1][1:] if not a.startswith("hydra.")])
    with hydra_configs():
        via_reproduce = compose(job)
        via_train_m = compose(["experiment=digits_2d_comparison", "head=arcface", "s=10", "m=0.2", "seed=0"])
    assert via_reproduce.trainer.num_threads == via_train_m.trainer.num_threads == 1


def test_reproduce_exits_1_when_a_sweep_or_the_report_failed_and_still_runs_every_step(outputs_dir, recorded, capsys):
    rec = Recorder(1, 0)  # the first sweep left failed jobs
    assert reproduce.main(["rbf_mnist_2d"], rec.commands) == 1
    assert [c[0] for c in rec.calls] == ["train", "train", "report", "plot"]
    rec = Recorder(0, 0, report_error=ConfigError("report: no job directories"))
    assert reproduce.main(["rbf_mnist_2d"], rec.commands) == 1
    assert [c[0] for c in rec.calls] == ["train", "train", "report", "plot"]
    assert "marginlab: error: report: no job directories" in capsys.readouterr().err


def test_a_value_that_does_not_compose_starts_nothing(outputs_dir, capsys):
    rec = Recorder()
    with pytest.raises(ConfigError, match=r"no job was started:\n  sweep 1: .*nope.* \[3 of 3 jobs\]"):
        reproduce.main(["rbf_cifar10", "head=nope"], rec.commands)
    assert rec.calls == [] and not (outputs_dir / "sweeps").exists()


def test_the_cli_lists_plans_and_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "experiment_names", lambda: ["lsoftmax_cifar10", "sphereface_casia"])
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"sphereface_casia +10 +SphereFace \(Liu et al., CVPR 2017\)", listing)
    assert re.search(r"lsoftmax_cifar10 +12 +L-Softmax .*CIFAR-10 test error", listing)
    assert main(["reproduce", "sphereface_casia", "trainer.epochs=2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "3 sweep(s), 10 jobs" in plan
    assert "2. marginlab train -m experiment=sphereface_casia backbone=sfnet64 m=1,2,3,4 trainer.epochs=2   # 4" in plan
    for args, message in [
        (["nope"], "unknown experiment 'nope'; choose one of lsoftmax_cifar10, sphereface_casia"),
        (["sphereface_casia", "--sweeps", "4"], "--sweeps '4' is not allowed"),
        ([], "reproduce: name an experiment"),
    ]:
        assert main(["reproduce", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_reproduce_runs_the_sweeps_into_one_sweep_dir_and_reports_them(outputs_dir, monkeypatch, capsys):
    """Two sweeps of the NormFace table (its center-loss rows) through the real `train -m` and `report`, the
    training faked: one sweep dir, every job counted, the paper's numbers beside ours, exit 1 for the failed job."""
    import marginlab.training.train as train_module

    def fake_train(cfg, run_dir):
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        normface = cfg.head._target_.endswith("NormFaceHead")
        if normface and cfg.regularizer:
            raise TrainingError("10 consecutive non-finite losses: training diverged")
        summary = {"status": "completed", "lfw/acc": 0.99 if normface else 0.98, "best_metric": "lfw/acc"}
        (run_dir / "metrics.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["reproduce", "normface_casia", "--sweeps", "3,4", "trainer.epochs=1"]) == 1
    out = capsys.readouterr().out
    (sweep_dir,) = (outputs_dir / "sweeps" / "normface_casia").iterdir()
    assert len(list(sweep_dir.rglob(".hydra"))) == 2
    assert "sweep: 2 jobs, 1 completed, 1 failed" in out  # the last sweep's summary counts both
    table = (sweep_dir / "report.md").read_text()
    assert "paper lfw/acc %" in table and "failed: " in table and "diverged" in table
    softmax_center = next(line for line in table.splitlines() if "99.03 [repo]" in line)  # the paper's number
    assert "| 98.00 " in softmax_center and "-1.03" in softmax_center and "softmax" in softmax_center


@pytest.mark.skipif(
    not os.environ.get("MARGINLAB_SLOW_TESTS"),
    reason="two digits trainings, their report and figures (10-25 s): set MARGINLAB_SLOW_TESTS=1",
)
def test_reproduce_trains_reports_and_plots_a_small_experiment(outputs_dir, capsys):
    """Two sweeps of the digits comparison, one epoch, one seed: amsoftmax trains, arcface m=1.8 (> pi/2) fails."""
    code = main(
        [
            "reproduce",
            "digits_2d_comparison",
            "--sweeps",
            "5,6",
            "seed=0",
            "m=1.8",
            "trainer.epochs=1",
            "dataset.batch_size=256",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # a job failed
    (sweep_dir,) = (outputs_dir / "sweeps" / "digits_2d_comparison").iterdir()
    assert sorted(re.search(r"head=\w+", p.parent.parent.name).group() for p in sweep_dir.rglob(".hydra")) == [
        "head=amsoftmax",
        "head=arcface",
    ]
    table = (sweep_dir / "report.md").read_text()
    assert re.search(r"\| amsoftmax +\| 1 +\| 0 ", table) and re.search(r"\| arcface +\| 0 +\| 1 ", table)
    assert "sweep: 2 jobs, 1 completed, 1 failed" in out  # the summary counts both sweeps
    assert (sweep_dir / "features_grid.png").is_file()


# ---------------------------------------------------------------- the m shorthand
@pytest.mark.parametrize(
    "overrides, m",
    [
        (["head=lsoftmax", "m=2"], 2),
        (["head=sphereface", "m=4"], 4),
        (["head=sphereface", "m=3.0"], 3),
        (["head=amsoftmax", "m=0.3"], 0.3),
    ],
)
def test_the_m_shorthand_reaches_integer_and_fractional_margins(overrides, m):
    with hydra_configs():
        cfg = compose(overrides)
    head = validate(cfg)
    assert cfg.head.m == m and type(cfg.head.m) is type(m)
    assert builders.build_head(head, in_features=4, num_classes=3).m == m


@pytest.mark.parametrize("head, name", [("lsoftmax", "LSoftmaxHead"), ("sphereface", "SphereFaceHead")])
def test_a_fractional_m_for_an_integer_margin_is_refused(run_train, capfd, head, name):
    code, _ = run_train(f"head={head}", "m=2.5", "trainer.epochs=1", "logger=quiet")
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"head.m=2.5 is not allowed: it must be an integer ({name}.m)" in err


def test_an_experiments_sweeps_never_block_a_resume():
    """A run saved before its experiment carried ``reproduce:`` (or with other sweeps) resumes: the sweeps say how
    the table is run, not what this run trains."""
    from marginlab.training.resume import config_changes

    saved = {"seed": 0, "head": {"m": 4}}
    assert config_changes(saved, {**saved, "reproduce": {"sweeps": [{"seed": "0,1,2"}], "plot": True}}) == []
    assert config_changes({**saved, "reproduce": {"sweeps": [{"m": "1,2"}]}}, {**saved, "reproduce": None}) == []
    assert config_changes(saved, {**saved, "head": {"m": 3}}) == ["head.m: 4 -> 3"]
