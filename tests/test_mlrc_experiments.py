"""experiment=mlrc_<data>_<head>: the protocol and best settings of Musgrave et al. 2020, "A Metric Learning Reality
Check", as its repository states them, and their provenance marks.

The values below are copied from KevinMusgrave/powerful-benchmarker, branch metric-learning, commit 222790a:
docs/papers/mlrc.md ("Optimal hyperparameters": weights / proxy lr, temperature / margin / scale, softmax_scale,
la / gamma / reg_weight) and src/powerful_benchmarker/configs/ (config_general/default.yaml batch_size 32,
freeze_trunk_batchnorm True; config_models/default.yaml embedder 128; config_optimizers/default.yaml RMSprop lr
1e-6, momentum 0.9, weight_decay 1e-4; config_loss_and_miners/with_classification_based_loss.yaml MPerClassSampler
m 1; config_dataset/default.yaml 4 training partitions; config_eval/default.yaml primary_metric
mean_average_precision_at_r).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import marginlab
from marginlab.commands.reproduce import experiment_names

from .test_experiments import compose

EXPERIMENTS = Path(marginlab.__file__).parent / "configs" / "experiment"
#: (data set, head) -> (weights lr, temperature) for Normalized Softmax, (weights lr, margin, scale) otherwise;
#: ArcFace's margin in degrees, as pytorch-metric-learning takes it
BEST = {
    ("cub", "normface"): (4.46e-3, 0.1087),
    ("cub", "cosface"): (2.53e-3, 0.6182, 100.0),
    ("cub", "arcface"): (5.13e-3, 23.22, 100.0),
    ("cars", "normface"): (1.10e-2, 0.0886),
    ("cars", "cosface"): (7.41e-3, 0.4324, 161.5),
    ("cars", "arcface"): (7.39e-06, 20.52, 49.50),
    ("sop", "normface"): (5.46e-4, 0.0630),
    ("sop", "cosface"): (2.16e-3, 0.3364, 100.0),
    ("sop", "arcface"): (2.01e-3, 18.63, 220.3),
}
#: (data set, head) -> proxy lr, softmax_scale (ProxyNCA); weights lr, la, gamma, reg_weight (None: N/A), margin
#: (SoftTriple)
PROXY_BEST = {
    ("cub", "proxynca"): (6.04e-3, 13.98),
    ("cars", "proxynca"): (4.43e-3, 7.97),
    ("sop", "proxynca"): (5.28e-4, 10.73),
    ("cub", "softtriple"): (5.37e-05, 78.02, 58.95, 0.3754, 0.4307),
    ("cars", "softtriple"): (1.40e-4, 17.69, 19.18, 0.0669, 0.3588),
    ("sop", "softtriple"): (8.68e-05, 100.00, 47.90, None, 0.3145),
}
DATA = {"cub": "CUB200Data", "cars": "Cars196Data", "sop": "SOPData"}
HEADS = {
    "normface": "NormFaceHead",
    "cosface": "AMSoftmaxHead",
    "arcface": "ArcFaceHead",
    "proxynca": "ProxyNCAHead",
    "softtriple": "SoftTripleHead",
}


def test_every_margin_and_proxy_head_has_an_mlrc_experiment_per_data_set():
    assert {f"mlrc_{d}_{h}" for d, h in [*BEST, *PROXY_BEST]} <= set(experiment_names())


def check_protocol(cfg, data: str, head: str) -> None:
    """The protocol every mlrc experiment shares (experiment=mlrc/<data>)."""
    assert cfg.dataset._target_.endswith(DATA[data]) and cfg.head._target_.endswith(HEADS[head])
    # batch 32, one image per class, 4 class-disjoint folds, selection on the fold's MAP@R
    assert (cfg.dataset.batch_size, cfg.dataset.samples_per_class, cfg.dataset.num_folds) == (32, 1, 4)
    assert cfg.dataset.val_fold == 0 and cfg.dataset.val_fraction == 0 and cfg.trainer.best_on == "val"
    assert cfg.backbone.embedding_dim == 128 and cfg.dataset.image_size == 227
    assert cfg.optim._target_ == "torch.optim.RMSprop"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (1e-6, 0.9, 1e-4)
    # freeze_trunk_batchnorm: the trunk's BatchNorm in eval mode, its weight and bias training
    assert cfg.trainer.freeze_batchnorm == "stats"
    # the selection and the reported number: the test classes at the best validation MAP@R
    assert cfg.paper.metric == "test/map_at_r" and cfg.paper.compare == "best/test/map_at_r"
    assert list(cfg.reproduce.sweeps) == [{"dataset.val_fold": "0,1,2,3"}]


@pytest.mark.parametrize(("data", "head"), sorted(BEST))
def test_the_protocol_and_best_settings_are_the_repositorys(data, head):
    cfg = compose(f"mlrc_{data}_{head}")
    check_protocol(cfg, data, head)
    # the loss's best settings: the class weights' lr, and the scale and margin in the head's units
    best = BEST[(data, head)]
    assert math.isclose(cfg.optim.lr * cfg.head.lr_mult, best[0], rel_tol=1e-9)
    if head == "normface":
        assert math.isclose(cfg.head.s, 1 / best[1], rel_tol=1e-4)  # s = 1 / temperature
    else:
        assert cfg.head.s == best[2]
        margin = math.radians(best[1]) if head == "arcface" else best[1]
        assert math.isclose(cfg.head.m, margin, abs_tol=1e-5)
    if head == "arcface":
        assert cfg.head.mode == "no_fallback"  # pytorch-metric-learning's ArcFaceLoss: cos(theta + m), no threshold


@pytest.mark.parametrize(("data", "head"), sorted(PROXY_BEST))
def test_the_proxy_losses_best_settings_are_the_repositorys(data, head):
    """pytorch-metric-learning v0.9.88's units: ProxyNCALoss's softmax_scale is head.softmax_scale (over every
    proxy); SoftTripleLoss's gamma is the softmax temperature (it multiplies by 1 / gamma) as head.gamma, its
    reg_weight head.tau (SOP's N/A: no centre term)."""
    cfg = compose(f"mlrc_{data}_{head}")
    check_protocol(cfg, data, head)
    best = PROXY_BEST[(data, head)]
    assert math.isclose(cfg.optim.lr * cfg.head.lr_mult, best[0], rel_tol=1e-9)  # the proxies' / centres' lr
    assert cfg.head.init == "official" and cfg.head.get("weight_decay") is None  # RMSprop's 1e-4, as the net
    if head == "proxynca":
        assert cfg.head.softmax_scale == best[1] and cfg.head.exclude_positive is False
    else:
        assert (cfg.head.la, cfg.head.gamma, cfg.head.margin) == (best[1], best[2], best[4])
        assert cfg.head.tau == (best[3] if best[3] is not None else 0.0)
        assert cfg.head.centers_per_class == 10  # not in the repository: marked [unverified]


@pytest.mark.parametrize(("data", "head"), sorted([*BEST, *PROXY_BEST]))
def test_each_setting_is_marked_with_its_file_and_no_number_is_claimed(data, head):
    """The settings carry [repo: docs/papers/mlrc.md]; the paper's accuracies are in no file of the repository, so
    none is carried and the experiment says so [unverified] (see marginlab/report/paper.py for the marks)."""
    text = (EXPERIMENTS / f"mlrc_{data}_{head}.yaml").read_text()
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "[repo: docs/papers/mlrc.md" in comments and "commit 222790a" in comments
    assert "numbers:" in comments and "[unverified]" in comments
    cfg = compose(f"mlrc_{data}_{head}")
    assert list(cfg.paper.results) == [] and cfg.paper.confidence == "unverified"
    assert "KevinMusgrave/powerful-benchmarker/docs/papers/mlrc.md" in cfg.paper.note
