"""A printed head says which margin it applies: ``ArcFaceHead(in_features=4, num_classes=3, s=64.0, m=0.5, ...)``,
for every shipped head config (its own defaults), learnt scalars as their current value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "marginlab" / "configs" / "head").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_printed_head_shows_its_settings(path):
    node = yaml.safe_load(path.read_text())
    cls = get_class(node.pop("_target_"))
    kwargs = {k: v for k, v in node.items() if k != "partial_fc"}
    head = cls(in_features=4, num_classes=3, **kwargs)
    text = repr(head)
    assert f"{type(head).__name__}(in_features=4, num_classes=3" in text
    for key in ("s", "m"):
        value = getattr(head, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert f"{key}={value}" in text


def test_a_learnt_scale_prints_its_current_value():
    from marginlab.heads.normface import NormFaceHead

    head = NormFaceHead(in_features=4, num_classes=3, learnable_scale=True)
    with torch.no_grad():
        head.s.fill_(12.5)
    assert "s=12.5" in repr(head)
