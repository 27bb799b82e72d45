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
from marginlab.commands.reproduce import spec_of
from marginlab.config.validate import import_target
from marginlab.data.base import ClassificationData
from marginlab.data.face import parse_image_size
from marginlab.report import check_paper
from marginlab.training import builders

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
        "digits_retrieval",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_first_training_step_runs(name, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from marginlab.training.train import train

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
    if not entries:  # the CPU-sized comparisons: no paper protocol, the honest default selection
        assert name in ("digits_2d_comparison", "digits_retrieval")
        # digits_retrieval: its test classes are never seen and never choose: the last epoch is reported
        assert cfg.dataset.val_fraction > 0 if name == "digits_2d_comparison" else cfg.trainer.best_on == "auto"
        return
    assert cfg.dataset.val_fraction == 0, f"{name}: the paper trained on the full training set"
    for entry in entries:
        compare = entry.get("compare")
        assert compare, f"{name}: paper entry {entry.get('match')} does not name the metric it is compared with"
        assert compare in (entry["metric"], f"best/{entry['metric']}"), f"{name}: {compare} vs {entry['metric']}"
        if compare.startswith("best/") and cfg.dataset.get("val_fold") is not None:  # the MLRC protocol (mlrc_*):
            # the test classes at the epoch chosen on a held-out fold of the training classes
            assert cfg.trainer.best_on == "val", f"{name}: {compare} with a val_fold but best_on={cfg.trainer.best_on}"
        elif compare.startswith("best/"):  # the best epoch: only a choice made on the metric's own split is that
            assert cfg.trainer.best_on == compare.split("/")[1], f"{name}: {compare} but best_on={cfg.trainer.best_on}"
        else:
            assert compare == entry["metric"], f"{name}: compared with {compare}, the paper reports {entry['metric']}"


#: the official nets' structure, read from the file each experiment's audit names (issue #22):
#: ydwen/caffe-face mnist_example/mnist_train_test.prototxt (center_mnist_2d), happynear/NormFace
#: mnist/lenet_train_test.prototxt (normface_mnist), wy1iu/sphereface train/code/sphereface_model.prototxt
#: (sphereface_casia) and happynear/AMSoftmax prototxt/face_train_test.prototxt (amsoftmax_casia)
OFFICIAL_NETS = {
    "center_mnist_2d": {"conv_bn": False, "prelu_after_convs": True, "last_pool": (3, 2), "feature_prelu": True,
                        "head_bias": False},
    "normface_mnist": {"conv_bn": False, "prelu_after_convs": True, "last_pool": (3, 2), "feature_prelu": False},
    "sphereface_casia": {"conv_bn": False, "prelu_after_convs": True, "feature_prelu": False},
    "amsoftmax_casia": {"conv_bn": False, "prelu_after_convs": True, "feature_prelu": False},
}  # fmt: skip
#: per fact, (what a "matches:" line claims, what a "differs:" line says) for the official value
CLAIMS = {
    ("conv_bn", False): (r"no\s+BN", r"\bBN\b"),
    ("prelu_after_convs", True): (r"PReLU after each conv", r"PReLU"),
    ("last_pool", (3, 2)): (r"pool 3/2", r"pool3 is 3/2"),
    ("feature_prelu", True): (r"PReLU on the (2-D )?feature", r"PReLU on the 2-D feature"),
    ("feature_prelu", False): (r"no activation on the feature", r"activation on the feature"),
    ("head_bias", False): (r"bias_term false", r"bias_term false"),
}


def audit_paragraph(name: str, label: str) -> str:
    """The experiment's ``#   <label>:`` paragraph of its audit comments (up to the next label), one line."""
    import re

    text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
    found = re.search(rf"^#   {label}:(.*?)(?=^#   [a-z ]+:|^[^#])", text, flags=re.M | re.S)
    return " ".join(line.lstrip("# ").strip() for line in found.group(1).splitlines()) if found else ""


def built_structure(name: str) -> dict:
    """The facts of ``OFFICIAL_NETS`` for the experiment's instantiated backbone and head: BN in the convs,
    PReLU after every conv, the last max-pool's (kernel, stride), an activation on the feature, the head's bias."""
    from marginlab.config.validate import resolve_head

    cfg = compose(name, *FAST)
    cls = import_target(cfg.dataset._target_, "dataset")
    size = cfg.dataset.get("image_size", None) or cls.image_size
    model = builders.build_model(cfg, int(cls.in_channels), size, 10, head=resolve_head(cfg.head))
    order = []  # the leaf modules in the order the forward runs them
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.backbone.modules()
             if not list(m.children())]  # fmt: skip
    h, w = parse_image_size(size)
    model.backbone.eval()(torch.zeros(1, int(cls.in_channels), h, w))
    for hook in hooks:
        hook.remove()
    convs = [i for i, m in enumerate(order) if isinstance(m, torch.nn.Conv2d)]
    after = [next(m for m in order[i + 1 :] if not isinstance(m, torch.nn.BatchNorm2d)) for i in convs]
    pools = [m for m in order if isinstance(m, torch.nn.MaxPool2d)]
    last_pool = (pools[-1].kernel_size, pools[-1].stride) if pools else None
    return {
        "conv_bn": any(isinstance(m, torch.nn.BatchNorm2d) for m in order),
        "prelu_after_convs": all(isinstance(m, torch.nn.PReLU) for m in after),
        "last_pool": tuple(v if isinstance(v, int) else v[0] for v in last_pool) if last_pool else None,
        "feature_prelu": isinstance(order[-1], (torch.nn.PReLU, torch.nn.ReLU)),
        "head_bias": getattr(model.head, "bias", None) is not None,
    }


@pytest.mark.parametrize("name", sorted(OFFICIAL_NETS))
def test_the_audit_claims_about_the_net_agree_with_the_built_net(name):
    """Issue #22: center_mnist_2d and normface_mnist claimed the official "pool 3/2" (and a PReLU on the feature)
    as matches while their backbones pool 2x2 (and have none). A "matches:" line may claim a fact of the official
    net only where the built net has it; every fact the built net lacks is named in a "differs:" line."""
    import re

    matches, differs = audit_paragraph(name, "matches"), audit_paragraph(name, "differs")
    ours = built_structure(name)
    for fact, official in OFFICIAL_NETS[name].items():
        claim, difference = CLAIMS[(fact, official)]
        if ours[fact] == official:
            continue
        assert not re.search(claim, matches), (
            f"{name}: 'matches:' claims {claim!r}, but the built net has {fact}={ours[fact]}"
        )
        assert re.search(difference, differs), f"{name}: the built net's {fact}={ours[fact]} is not named in 'differs:'"
