"""Every `experiment=<name>` composes, carries a well-formed `paper:` block, and its first training step runs.

The data is generated (the experiment's image shape, 10 classes, one batch of two images) so nothing is
downloaded; backbone, head, regularizers, optimiser, schedule and verification come from the experiment.
"""

from __future__ import annotations

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
from marginlab.reproduce import spec_of

CONFIGS = Path(marginlab.__file__).parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUPS = {"backbone", "head", "dataset", "optim", "sched", "regularizer", "verification"}
# one step on CPU: float32, no checkpoint, quiet logging, no verification sets (they need downloaded .bin files)
FAST = [
    "trainer.epochs=1",
    "trainer.checkpoint=false",
    "logger=quiet",
    "trainer.device=cpu",
    "trainer.precision=32",
    "trainer.compile=false",
    "verification=[]",
]


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
    assert {
        "lsoftmax_mnist",
        "lsoftmax_cifar10",
        "lsoftmax_cifar10plus",
        "lsoftmax_cifar100",
        "lsoftmax_mnist_2d",
        "sphereface_casia",
        "amsoftmax_casia",
        "center_casia",
        "center_mnist_2d",
        "normface_mnist",
        "normface_casia",
        "rbf_mnist_2d",
        "rbf_cifar10",
        "rbf_imagenet",
        "arcface_casia",
        "digits_2d_comparison",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_first_training_step_runs(name, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from marginlab.train import train

    assert (CONFIGS / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")  # deltas only
    cfg = compose(name, *FAST)
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else {}
    check_paper(paper or None, f"experiment={name}: paper")
    check_selection(name, cfg)
    # its sweeps are its own (marginlab reproduce <name>), well formed
    assert "\nreproduce:" in (CONFIGS / "experiment" / f"{name}.yaml").read_text(), f"{name}: no sweeps of its own"
    spec = spec_of(name, OmegaConf.to_container(cfg.reproduce) if cfg.reproduce is not None else None)
    assert spec.sweeps and all(sweep[0].startswith("experiment=") for sweep in spec.sweeps)
    for entry in paper.get("results") or []:
        for key in entry.get("match") or {}:
            assert key.split(".")[0] in GROUPS, f"{name}: paper match key {key!r} is not a config group or group key"

    data = generated_like(cfg)
    monkeypatch.setattr(builders, "build_data", lambda cfg: data)
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert 0.0 <= summary["test/acc"] <= 1.0


def paper_entries(cfg) -> list[dict]:
    """Each published number of the experiment with its block's keys merged in (what the report reads)."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else {}
    return [{**paper, **entry} for entry in paper.get("results") or []] or ([paper] if paper else [])


def check_selection(name: str, cfg) -> None:
    """The papers trained on the whole training set and report their final model (RBF-Softmax on ImageNet: its
    best epoch on val/, the test split here): no validation split, and every published number says which
    metrics.json key of ours it is compared with. The choice is written in the experiment's comments."""
    text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "val_fraction" in comments, f"{name}: the comments do not say which images train and which choose"
    entries = paper_entries(cfg)
    if not entries:  # the CPU-sized comparison: no paper protocol, the honest default selection
        assert name == "digits_2d_comparison" and cfg.dataset.val_fraction > 0
        return
    assert cfg.dataset.val_fraction == 0, f"{name}: the paper trained on the full training set"
    for entry in entries:
        compare = entry.get("compare")
        assert compare, f"{name}: paper entry {entry.get('match')} does not name the metric it is compared with"
        assert compare in (entry["metric"], f"best/{entry['metric']}"), f"{name}: {compare} vs {entry['metric']}"
        if compare.startswith("best/"):  # the best epoch: only a choice made on the metric's own split is that
            assert cfg.trainer.best_on == compare.split("/")[1], f"{name}: {compare} but best_on={cfg.trainer.best_on}"
        else:
            assert compare == entry["metric"], f"{name}: compared with {compare}, the paper reports {entry['metric']}"
