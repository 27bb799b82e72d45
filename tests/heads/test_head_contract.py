"""The head contract, one table over every configs/head/*.yaml: built with its defaults as the trainer
builds it; a bad value refused, naming the key, on the trainer's own path (``check_target_node`` for a
wrong type, the constructor's range check at build time); evaluation logits without labels are
(B, C) and finite; state a head keeps (annealing counters, running statistics) moves only in training.

What every head shares is checked here; each tests/heads/test_<head>.py checks what is its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import marginlab
from marginlab.config.validate import check_target_node, resolve_head, split_head
from marginlab.errors import ConfigError
from marginlab.training.builders import build_head

HEAD_CONFIGS = Path(marginlab.__file__).parent / "configs" / "head"
HEADS = sorted(p.stem for p in HEAD_CONFIGS.glob("*.yaml"))
D, C, B = 8, 10, 12

#: config -> (key, an out-of-range value, the allowed range the message names)
OUT_OF_RANGE = {
    "adacos": ("lr_mult", 0.0, "(0, inf]"),  # its own keys are choices: the common key of every head
    "adaface": ("s", 0.0, "(0, inf]"),
    "amsoftmax": ("s", 0.0, "(0, inf]"),
    "arcface": ("s", 0.0, "(0, inf]"),
    "coco": ("s", 0.0, "(0, inf]"),
    "combined": ("s", 0.0, "(0, inf]"),
    "cosface": ("s", 0.0, "(0, inf]"),
    "cosine": ("s", 0.0, "(0, inf]"),
    "curricularface": ("s", 0.0, "(0, inf]"),
    "elasticface": ("s", 0.0, "(0, inf]"),
    "l2softmax": ("p", 0.0, "(0, 1]"),
    "lsoftmax": ("m", 0, "integer >= 1"),
    "magface": ("s", 0.0, "(0, inf]"),
    "normface": ("s", 0.0, "(0, inf]"),
    "proxy_anchor": ("alpha", 0.0, "(0, inf]"),
    "proxy_nca": ("softmax_scale", 0.0, "(0, inf]"),
    "rbf": ("s", 0.0, "(0, inf]"),
    "sface": ("k", 0.0, "(0, inf]"),
    "softmax": ("lr_mult", 0.0, "(0, inf]"),  # its only own key is a bool: the common key of every head
    "softtriple": ("la", 0.0, "(0, inf]"),
    "sphereface": ("m", 0, "integer >= 1"),
    "sphereface2": ("alpha", 1.0, "(0, 1)"),
    "spherefacer": ("m", 0.5, "[1, inf]"),
    "subcenter_arcface": ("s", 0.0, "(0, inf]"),
    "uniface": ("r", 0.0, "(0, 1]"),
    "x2softmax": ("s", 0.0, "(0, inf]"),
}
#: keys whose stored attribute is derived from the config value rather than the value itself
DERIVED = {
    ("l2softmax", "alpha"),
    ("l2softmax", "bias"),
    ("softmax", "bias"),
    ("elasticface", "m"),  # null: the official config's value for the variant
    ("elasticface", "std"),
}


def head_node(name: str, **overrides):
    """configs/head/<name>.yaml without ``partial_fc`` (as ``split_head`` gives it to the builder)."""
    node = OmegaConf.load(HEAD_CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        node[key] = value
    return split_head(node)[0]


def own_keys(name: str) -> list[str]:
    return [k for k in head_node(name) if not str(k).startswith("_")]


def wrong_type(default):
    """A value of another type than the default: a string for numbers and flags, else a flag."""
    return "abc" if not isinstance(default, str) else True


def test_every_config_is_in_the_table():
    assert set(OUT_OF_RANGE) == set(HEADS)


@pytest.mark.parametrize("name", HEADS)
def test_builds_with_its_defaults(name):
    node = head_node(name)
    check_target_node("head", node)  # the defaults pass the trainer's validation
    head = instantiate(node, in_features=D, num_classes=C)
    assert type(head).__name__ == node._target_.rpartition(".")[2]
    assert (head.in_features, head.num_classes) == (D, C)
    for key in own_keys(name):
        if (name, key) in DERIVED:
            continue
        value = getattr(head, key)
        value = value.item() if isinstance(value, torch.Tensor) else value  # a learnable scale
        assert value == pytest.approx(node[key]) if isinstance(node[key], float) else value == node[key], key


@pytest.mark.parametrize("name, key", [(n, k) for n in HEADS for k in own_keys(n)])
def test_wrong_type_is_refused_naming_the_key(name, key):
    bad = wrong_type(head_node(name)[key])
    with pytest.raises(ConfigError, match=rf"^head\.{key}={bad!r} is not allowed: it must be "):
        check_target_node("head", head_node(name, **{key: bad}))


@pytest.mark.parametrize("name", HEADS)
def test_out_of_range_is_refused_at_build_naming_the_key(name):
    key, bad, allowed = OUT_OF_RANGE[name]
    node = head_node(name, **{key: bad})
    check_target_node("head", node)  # well typed: the constructor refuses the range
    with pytest.raises(ConfigError) as err:
        build_head(resolve_head(node), D, C)
    assert str(err.value).startswith(f"{key}={bad!r} is not allowed") and allowed in str(err.value)


#: the heads without the chunked cross-entropy, and why (``why_not_chunked``: ``MarginHead.chunked_refusal``)
NO_CHUNKED = {
    **dict.fromkeys(("proxy_anchor", "proxy_nca", "sface", "sphereface2", "spherefacer", "uniface"), "loss"),
    **dict.fromkeys(("l2softmax", "lsoftmax", "rbf", "softmax", "softtriple", "sphereface"), "logits"),
}
REASONS = {
    "loss": "it is a loss of its own, not a softmax cross-entropy over the classes",
    "logits": "its logits are not s cos theta with a margin on the target cosine",
}


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("value", [True, "auto", False])
def test_chunked_is_refused_in_one_line_by_every_head_without_it(name, value):
    node = OmegaConf.load(HEAD_CONFIGS / f"{name}.yaml")
    node.chunked = value
    if name == "adacos" and value is True:  # its default mode=dynamic: refused by the instance (test_adacos.py)
        with pytest.raises(ConfigError, match="^chunked=true is not allowed with AdaCosHead mode=dynamic: "):
            build_head(resolve_head(node), D, C)
        return
    if name not in NO_CHUNKED or value is False:  # false: what every head does (dropped where it is no argument)
        assert getattr(build_head(resolve_head(node), D, C), "chunked", False) == value
        return
    shown = "true" if value is True else repr(value)
    cls = node._target_.rpartition(".")[2]
    with pytest.raises(ConfigError) as err:
        resolve_head(node)
    assert str(err.value) == (
        f"chunked={shown} is not allowed with {cls}: the chunked cross-entropy is not available for it, as "
        f"{REASONS[NO_CHUNKED[name]]}; use chunked=false"
    )


@pytest.mark.parametrize("name", HEADS)
def test_eval_logits_without_labels_are_b_by_c_and_finite(name, hh):
    head = instantiate(head_node(name), in_features=D, num_classes=C).eval()
    x, _ = hh.make_batch(head, batch=B)  # with a feature collinear with its class, one opposite, one zero
    with torch.no_grad():
        logits = head(x)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", HEADS)
def test_state_moves_only_in_training(name, hh):
    head = instantiate(head_node(name), in_features=D, num_classes=C)
    x, labels = hh.make_batch(head, batch=B)

    def state():
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    start = state()
    head.eval()
    with torch.no_grad():
        head(x, labels)
        head(x)
    for key, value in state().items():
        torch.testing.assert_close(value, start[key], atol=0, rtol=0, msg=f"eval forward changed {key}")
    head.train()
    head(x, labels)
    after = state()
    moved = {k for k in start if not torch.equal(after[k], start[k])}
    buffers = {k for k, _ in head.named_buffers()}
    if getattr(head, "renormalizes_weight", False):  # official opensphere heads: W's rows renormalised in place
        moved.discard("weight")
    assert moved == buffers, f"a training forward moved {sorted(moved)}, the head's buffers are {sorted(buffers)}"
