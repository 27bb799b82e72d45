"""Every `experiment=<name>` composes, carries a well-formed `paper:` block, and its first training step runs.

The data is generated (the experiment's image shape, 10 classes, one batch of two images) so nothing is
downloaded; backbone, head, regularizers, optimiser, schedule and verification come from the experiment.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import marginlab
import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import builders
from marginlab.config.validate import import_target
from marginlab.data.base import ClassificationData
from marginlab.data.face import parse_image_size
from marginlab.report import check_paper
from marginlab.report.paper import CONFIDENCE, REPO_FILE

CONFIGS = Path(marginlab.__file__).parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GROUPS = {"backbone", "head", "dataset", "optim", "sched", "regularizer", "verification"}
# one step on CPU: float32, no checkpoint, quiet logging, no verification sets (they need downloaded .bin files)
FAST = ["trainer.epochs=1", "trainer.checkpoint=false", "logger=quiet", "trainer.device=cpu",
        "trainer.precision=32", "trainer.compile=false", "verification=[]"]


class GeneratedData(ClassificationData):
    """Two random images of the experiment's shape: one training step, one evaluation batch."""

    num_classes = 10

    def __init__(self, in_channels: int, image_size):
        super().__init__(batch_size=2)
        self.in_channels, self.image_size = in_channels, image_size

    def setup(self) -> None:
        h, w = parse_image_size(self.image_size)
        gen = torch.Generator().manual_seed(0)
        images, labels = torch.randn(2, self.in_channels, h, w, generator=gen), torch.tensor([0, 1])
        self.train_set = self.val_set = self.test_set = TensorDataset(images, labels)  # evaluated as val/ and test/


def generated_like(cfg) -> GeneratedData:
    """The experiment's channels and image size; 112-224 pixel inputs halved or more to keep the test fast (the
    face and ImageNet nets size their last layers from the input)."""
    cls = import_target(cfg.dataset._target_, "dataset")
    h, w = parse_image_size(cfg.dataset.get("image_size", None) or cls.image_size)
    if h >= 112:
        scale = 64 / h if h > 112 else 0.5
        h, w = int(h * scale), int(w * scale)
    return GeneratedData(int(cls.in_channels), h if h == w else (h, w))


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        return hydra_compose("train", overrides=[f"experiment={name}", *overrides])


def test_there_is_an_experiment_per_paper_table():
    assert {"lsoftmax_mnist", "lsoftmax_cifar10", "lsoftmax_cifar10plus", "lsoftmax_cifar100", "lsoftmax_mnist_2d",
            "sphereface_casia", "amsoftmax_casia", "center_casia", "center_mnist_2d", "normface_mnist",
            "normface_casia", "rbf_mnist_2d", "rbf_cifar10", "rbf_imagenet", "arcface_casia",
            "digits_2d_comparison"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_first_training_step_runs(name, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from marginlab.train import train

    assert (CONFIGS / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")  # deltas only
    cfg = compose(name, *FAST)
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else {}
    check_paper(paper or None, f"experiment={name}: paper")
    for entry in paper.get("results") or []:
        for key in entry.get("match") or {}:
            assert key.split(".")[0] in GROUPS, f"{name}: paper match key {key!r} is not a config group or group key"

    data = generated_like(cfg)
    monkeypatch.setattr(builders, "build_data", lambda cfg: data)
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert 0.0 <= summary["test/acc"] <= 1.0


def test_every_experiment_has_a_script():
    scripts = "\n".join(p.read_text() for p in SCRIPTS.glob("*.sh"))
    for name in EXPERIMENTS:
        assert f"experiment={name}" in scripts, f"no script in scripts/ runs experiment={name}"


#: a confidence mark in an experiment's comments: [repo: <file(s)>], [cited: <who quotes it>], [unverified]
MARK = re.compile(r"\[(repo|cited|unverified)\b([^\]]*)\]")
FILE = re.compile(r"[\w.+-]*\w\.[A-Za-z0-9]+")  # README.md, myexamples/mnist/mnist_solver.prototxt, ...


def comments(name: str) -> str:
    """The experiment's comments as one text (wrapped marks joined)."""
    lines = (CONFIGS / "experiment" / f"{name}.yaml").read_text().splitlines()
    return " ".join(line.split("#", 1)[1].strip() for line in lines if "#" in line)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_published_number_carries_a_mark_and_a_repo_mark_names_its_file(name):
    """The marks of shared/reference/papers.md: [repo] = read in a file of the official repository (named beside
    it), [cited] = quoted by a third party (named), else [unverified]; in the paper: block and in the comments."""
    from omegaconf import OmegaConf

    cfg = compose(name)
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else {}
    for i, entry in enumerate(paper.get("results") or []):
        merged = {**paper, **entry}
        where = f"experiment={name}: paper.results[{i}] ({entry.get('value')})"
        assert merged.get("confidence") in CONFIDENCE, f"{where} has no mark"
        if merged["confidence"] == "repo":
            assert REPO_FILE.search(str(merged.get("evidence") or "")), f"{where}: [repo] without the repository's file"
        if merged["confidence"] == "cited":
            assert str(merged.get("evidence") or "").strip(), f"{where}: [cited] without who quotes it"
    text = comments(name)
    for mark, beside in MARK.findall(text):
        if mark == "repo":
            assert beside.startswith(":") and FILE.search(beside), f"experiment={name}: [repo{beside}] names no file"
        if mark == "cited":
            assert beside.startswith(":") and beside[1:].strip(), f"experiment={name}: [cited{beside}] names no source"
    loose = re.findall(r"\[(?:repo|cited|unverified)[^\]:]*/[^\]]*\]", text)  # e.g. [cited/unverified]
    assert not loose, f"experiment={name}: ambiguous marks {loose}"
