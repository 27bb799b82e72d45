"""marginlab/checks.py: the shared validators, and the import structure they exist for: backbones,
regularizers, data modules and schedules validate through ``marginlab.checks``, so importing them does
not load the heads (and their fused autograd kernels)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from marginlab.checks import check_batch, check_float, check_positive_int
from marginlab.errors import ConfigError

#: modules beside or below the heads, besides every module of PACKAGES: none of them may load marginlab.heads
NOT_HEADS = ["marginlab.checks", "marginlab.dtypes", "marginlab.training.schedules"]
PACKAGES = ["marginlab.backbones", "marginlab.data", "marginlab.regularizers"]


def _loaded_after_import(modules: list[str]) -> set[str]:
    """The marginlab/torch modules a fresh interpreter holds after importing ``modules``."""
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('marginlab', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_backbones_regularizers_data_and_schedules_do_not_import_heads():
    import importlib
    import pkgutil

    modules = list(NOT_HEADS)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        modules += [package] + [m.name for m in pkgutil.walk_packages(path, prefix=package + ".")]
    assert {"marginlab.backbones.lenet_pp", "marginlab.data.base", "marginlab.regularizers.center"} <= set(modules)
    loaded = _loaded_after_import(modules)
    assert set(modules) <= loaded
    assert not {m for m in loaded if m.startswith("marginlab.heads")}


def test_checks_import_no_torch():
    loaded = _loaded_after_import(["marginlab.checks"])
    assert "marginlab.checks" in loaded and "torch" not in loaded


def test_check_positive_int_and_float_name_key_value_and_range():
    assert check_positive_int("k", 3) == 3
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ConfigError, match=rf"^k={bad!r} is not allowed: it must be an integer >= 1"):
            check_positive_int("k", bad)
    assert check_float("m", 1) == 1.0 and isinstance(check_float("m", 1), float)
    with pytest.raises(ConfigError, match=r"^m=0 is not allowed: it must lie in \(0, 1\]"):
        check_float("m", 0, low=0.0, high=1.0, low_inclusive=False)
    with pytest.raises(ConfigError, match=r"^m=inf is not allowed: it must be a finite number"):
        check_float("m", float("inf"))


def test_check_batch_names_owner_shape_and_dtype():
    x = torch.zeros(4, 3)
    check_batch("Head", 3, x)
    check_batch("Head", 3, x, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(
        ConfigError,
        match=r"Head expects embeddings of shape \(batch, 5\), got \(4, 3\).*"
        r"embedding_dim must equal Head's in_features",
    ):
        check_batch("Head", 5, x)
    with pytest.raises(ConfigError, match=r"labels of shape \(3,\) do not match a batch of 4"):
        check_batch("Head", 3, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer class indices"):
        check_batch("Head", 3, x, torch.zeros(4))
