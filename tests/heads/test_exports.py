"""The heads package as a library and as one unit (issues #15, #17): ``from marginlab.heads import ArcFace``
for every configured head; what a head offers the geometry probe declared in one place
(heads/probe.py; tests/test_import_layering.py checks that no module outside heads/ and the
builder imports a concrete head); the kernels are one unit with a small public surface."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch
import yaml

import marginlab
from marginlab import heads
from marginlab.heads.probe import ProbedHead, ProbeMargin

PACKAGE = Path(marginlab.__file__).parent
HEAD_CONFIGS = sorted((PACKAGE / "configs" / "head").glob("*.yaml"))


def configured_classes() -> dict[str, type]:
    """config name -> the class behind its ``_target_``."""
    found = {}
    for path in HEAD_CONFIGS:
        module, name = yaml.safe_load(path.read_text())["_target_"].rsplit(".", 1)
        found[path.stem] = getattr(importlib.import_module(module), name)
    return found


def test_all_re_exports_every_configured_head_class():
    exported = {getattr(heads, name) for name in heads.__all__}
    classes = configured_classes()
    assert len(classes) >= 16
    missing = {cfg: cls.__name__ for cfg, cls in classes.items() if cls not in exported}
    assert not missing, f"configs/head/*.yaml targets not in marginlab.heads.__all__: {missing}"
    for cls in classes.values():  # under its class name, too
        assert cls.__name__ in heads.__all__ and getattr(heads, cls.__name__) is cls


def test_paper_names_import_as_documented():
    from marginlab.heads import ArcFace, CosFace, SphereFace

    assert ArcFace is configured_classes()["arcface"]
    assert CosFace is configured_classes()["cosface"]
    assert SphereFace is configured_classes()["sphereface"]
    assert sorted(heads.__all__) == sorted(set(heads.__all__))
    assert all(hasattr(heads, name) for name in heads.__all__)


#: heads that classify x / ||x|| without being cosine-margin heads: the losses of their own and SoftTriple
PURE_COSINE = {"proxy_anchor", "proxy_nca", "softtriple", "sface", "uniface", "sphereface2", "spherefacer"}


@pytest.mark.parametrize("name", [p.stem for p in HEAD_CONFIGS])
def test_every_head_declares_what_it_offers_the_probe(hh, name):
    head = hh.instantiate(name, in_features=4, num_classes=5)
    assert isinstance(head, ProbedHead)
    assert isinstance(head.probe_margin, ProbeMargin) and not hasattr(head, "probe_record")
    assert head.normalized_features == (isinstance(head, heads.CosineMarginHead) or name in PURE_COSINE)
    assert head.weights_are_points == (name == "rbf")
    x, labels = hh.make_batch(head, batch=3, special=False)
    head(x, labels)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    cos = head.cosine(x)  # pure: no gradient, no state, the same twice
    assert cos.shape == (3, 5) and not cos.requires_grad and torch.equal(cos, head.cosine(x))
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in state.items())


def test_probe_margin_matches_each_margin_form():
    t, o = torch.cos(torch.tensor([0.2, 0.6])), torch.cos(torch.tensor([1.0, 1.0]))
    assert ProbeMargin().violation(t, o).tolist() == [False, False] and not ProbeMargin().enforced
    assert ProbeMargin(m2=0.5).violation(t, o).tolist() == [False, True]  # 0.2 + 0.5 < 1, 0.6 + 0.5 > 1
    assert ProbeMargin(m1=2.0).violation(t, o).tolist() == [False, True]  # 0.4 < 1, 1.2 > 1
    assert ProbeMargin(m3=0.3).violation(t, o).tolist() == [False, True]  # cos gaps 0.44 > 0.3, 0.29 <= 0.3
    combined = ProbeMargin(m1=1.0, m2=0.3, m3=0.2)  # cos(theta + 0.3) - 0.2 vs cos 1
    expected = (torch.cos(torch.tensor([0.5, 0.9])) - 0.2 <= o).tolist()
    assert combined.violation(t, o).tolist() == expected == [False, True]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in a file, absolute or resolved from relative."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
    return found


def test_kernels_are_one_unit_with_a_public_surface():
    from marginlab.heads import kernels

    kernel_modules = {p.stem for p in (PACKAGE / "heads" / "kernels").glob("*.py")} - {"__init__"}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        inside = rel.parts[:2] == ("heads", "kernels")
        for module, names in _imports(path):
            if not module.startswith("marginlab.heads.kernels"):
                continue
            # no private name crosses a module boundary, inside the unit or out of it
            assert not [n for n in names if n.startswith("_")], f"{rel} imports private {names} from {module}"
            if not inside:  # outside the unit: only the package, only its public names
                assert module == "marginlab.heads.kernels", f"{rel} imports {module}: use marginlab.heads.kernels"
                assert set(names) <= set(kernels.__all__), f"{rel}: {set(names) - set(kernels.__all__)}"
    assert kernel_modules == {"chunked_margin_ce", "fast_cosine", "fused_margin"}
    assert all(hasattr(kernels, name) for name in kernels.__all__)
