"""Every job of every ``scripts/*.sh`` composes, validates and takes one optimizer step; experiment comments name
scripts that exist and run them; the top-level ``m=`` shorthand reaches integer margins.

Each script's ``$ml train -m ...`` lines are parsed (bash arrays such as ``"${common[@]}"`` expanded) and
expanded by Hydra's own basic sweeper into every override combination. Jobs that differ only in ``seed`` share
one config, so one of them is stepped. The step uses the building blocks of ``marginlab train``
(builders.build_model / build_optimizer / build_scheduler, engine.compute_loss) on two generated images of the
data set's channels and class count, at a small image size for the 112-224 pixel nets: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import marginlab
import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import builders
from marginlab.config.validate import apply_shorthands, import_target, validate
from marginlab.data.face import parse_image_size
from marginlab.engine import compute_loss

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
EXPERIMENTS = Path(marginlab.__file__).parent / "configs" / "experiment"
#: CPU, float32, no checkpoint, quiet: the parts of a run these tests do not exercise
FAST = ["trainer.device=cpu", "trainer.precision=32", "trainer.compile=false", "trainer.checkpoint=false",
        "logger=quiet"]
#: the published class counts of the data sets whose count is read from the data (CASIA-WebFace, ImageNet)
NUM_CLASSES = {"CasiaData": 10572, "ImageNetData": 1000}
TRAIN_LINE = re.compile(r"^\s*\$ml\s+train\s+(.*?)\s*(\|\|.*)?$")
ARRAY_LINE = re.compile(r"^\s*(\w+)=\((.*)\)\s*$")


def script_commands(path: Path) -> list[list[str]]:
    """The override lists of a script's ``$ml train`` lines, without ``-m``, ``"$@"`` and ``hydra.sweep.dir``."""
    arrays: dict[str, list[str]] = {}
    commands = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if m := ARRAY_LINE.match(line):
            arrays[m.group(1)] = shlex.split(m.group(2))
        elif m := TRAIN_LINE.match(line):
            tokens = []
            for token in shlex.split(m.group(1)):
                if a := re.fullmatch(r"\$\{(\w+)\[@\]\}", token):
                    tokens += arrays[a.group(1)]
                else:
                    tokens.append(token)
            tokens = [t for t in tokens if t not in ("-m", "--multirun", "$@") and not t.startswith("hydra.sweep.dir=")]
            bad = [t for t in tokens if "$" in t or not re.match(r"^[~+]{0,2}[\w./@\[\]-]+(=|$)", t)]
            assert not bad, f"{path.name}: cannot read the overrides {bad} of `{line.strip()}`"
            commands.append(tokens)
    return commands


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job of a multirun, in Hydra's order (its basic sweeper's own expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def script_jobs(path: Path) -> list[list[str]]:
    return [job for command in script_commands(path) for job in expand(command)]


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
    apply_shorthands(cfg)
    validate(cfg)
    builders.build_verifiers(cfg.get("verification"))  # lazy: checks the nodes, reads nothing
    in_channels, image_size, num_classes = small_shape(cfg)
    torch.manual_seed(0)
    model = builders.build_model(cfg, in_channels, image_size, num_classes)
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg, optimizer, steps_per_epoch=1)
    h, w = parse_image_size(image_size)
    images, labels = torch.randn(2, in_channels, h, w), torch.tensor([0, num_classes - 1])
    model.train()
    embeddings, logits = model(images, labels)
    loss = compute_loss(model, embeddings, logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_the_parser_reads_every_job_of_a_sweep():
    jobs = script_jobs(ROOT / "scripts" / "digits_2d_comparison.sh")
    assert len(jobs) == 7 * 3  # 7 settings x 3 seeds: the `common` array expanded, every combination
    assert ["experiment=digits_2d_comparison", "seed=2", "head=arcface", "s=10", "m=0.2"] in jobs
    assert ["experiment=digits_2d_comparison", "seed=0", "head=rbf"] in jobs
    by_m = script_jobs(ROOT / "scripts" / "sphereface_casia_by_m.sh")
    assert [j for j in by_m if "m=3" in j] == [["experiment=sphereface_casia", "backbone=sfnet64", "m=3"]]
    assert len(by_m) == 5 and len(distinct_settings(script_jobs(ROOT / "scripts" / "center_casia.sh"))) == 2


@pytest.fixture
def cheap_steps(monkeypatch):
    """One thread (these tiny steps run several times slower on two busy cores than on one), and jobs of one
    script with the same backbone node and input share one backbone instance, reset to its initial weights
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


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_job_of_the_script_takes_a_training_step(script, cheap_steps):
    jobs = script_jobs(script)
    assert jobs, f"{script.name} runs no `$ml train` job"
    with hydra_configs():
        for job in distinct_settings(jobs):
            try:
                loss = one_step(job)
            except Exception as exc:  # name the job: a script's sweep has many
                raise AssertionError(f"{script.name}: `marginlab train -m {' '.join(job)}` fails: {exc}") from exc
            assert math.isfinite(loss), f"{script.name}: {' '.join(job)}: loss {loss}"


def test_experiment_comments_name_scripts_that_exist_and_run_them():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        named = re.findall(r"scripts/([\w-]+\.sh)", path.read_text())
        assert named, f"experiment={path.stem} names no script in its comments"
        for name in named:
            script = ROOT / "scripts" / name
            assert script.is_file(), f"experiment={path.stem} points to scripts/{name}, which does not exist"
            runs = {o.partition("=")[2] for job in script_jobs(script) for o in job if o.startswith("experiment=")}
            assert path.stem in runs, f"experiment={path.stem} points to scripts/{name}, which runs {sorted(runs)}"


def test_every_experiment_is_run_by_a_script():
    run = {o.partition("=")[2] for s in SCRIPTS for job in script_jobs(s) for o in job if o.startswith("experiment=")}
    assert {p.stem for p in EXPERIMENTS.glob("*.yaml")} <= run


@pytest.mark.parametrize("overrides, m", [(["head=lsoftmax", "m=2"], 2), (["head=sphereface", "m=4"], 4),
                                          (["head=sphereface", "m=3.0"], 3), (["head=amsoftmax", "m=0.3"], 0.3)])
def test_the_m_shorthand_reaches_integer_and_fractional_margins(overrides, m):
    with hydra_configs():
        cfg = compose(overrides)
    apply_shorthands(cfg)
    validate(cfg)
    assert cfg.head.m == m and type(cfg.head.m) is type(m)
    assert builders.build_head(cfg, in_features=4, num_classes=3).m == m


@pytest.mark.parametrize("head, name", [("lsoftmax", "LSoftmaxHead"), ("sphereface", "SphereFaceHead")])
def test_a_fractional_m_for_an_integer_margin_is_refused(run_train, capfd, head, name):
    code, _ = run_train(f"head={head}", "m=2.5", "trainer.epochs=1", "logger=quiet")
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"head.m=2.5 is not allowed: it must be an integer ({name}.m)" in err
