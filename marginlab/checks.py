"""Checks shared by every package: a hyperparameter, an image size or an input batch is refused with a
ConfigError that names the key, the value and what is allowed.

Heads, regularizers, backbones, data modules, schedules and export all validate through here, so
importing one of them loads nothing of the others. Only ``errors`` and the standard library are imported at
module level (``check_batch`` is handed tensors, so torch is already loaded when it runs).
"""

from __future__ import annotations

import math

from marginlab.errors import ConfigError


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
    return value


def check_dir_name(name: str, value) -> str:
    """One path component (``name=``, part of a run or sweep directory's name): never a path, so never a
    directory outside ``outputs/``. Not empty, not ``.`` or ``..``, no ``/`` or ``\\``."""
    text = str(value)
    if text in ("", ".", "..") or any(c in text for c in "/\\\0"):
        raise ConfigError(
            f"{name}={value!r} is not allowed: it must be one directory name (not empty, not '.' or '..', "
            "without '/' or '\\'), e.g. name=arcface_m05"
        )
    return text


def check_float(
    name: str, value, low: float | None = None, high: float | None = None, low_inclusive: bool = True
) -> float:
    """Checks a float hyperparameter against [low, high] (or (low, high] with low_inclusive=False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not allowed: it must be a finite number")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    if too_low or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "[" if low_inclusive else "("
        raise ConfigError(f"{name}={value!r} is not allowed: it must lie in {bracket}{lo}, {hi}]")
    return float(value)


def image_hw(image_size, key: str = "backbone.image_size") -> tuple[int, int]:
    """``112`` -> (112, 112); ``[112, 96]`` -> (112, 96) (height, width)."""
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return image_size, image_size
    try:
        h, w = (int(v) for v in image_size)
        if h > 0 and w > 0 and all(not isinstance(v, bool) and float(v) == int(v) for v in image_size):
            return h, w
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={image_size!r} is not allowed: give an integer >= 1 (square) or [height, width]")


def check_batch(owner: str, in_features: int, embeddings, labels=None) -> None:
    """Checks a batch handed to ``owner`` (a head or regularizer, by class name): embeddings of shape
    (B, in_features) and, unless None, labels of shape (B) holding integer class indices."""
    if embeddings.dim() != 2 or embeddings.shape[1] != in_features:
        raise ConfigError(
            f"{owner} expects embeddings of shape (batch, {in_features}), "
            f"got {tuple(embeddings.shape)}: backbone.embedding_dim must equal {owner}'s in_features"
        )
    if labels is None:
        return
    if labels.shape != embeddings.shape[:1]:
        raise ConfigError(
            f"labels of shape {tuple(labels.shape)} do not match a batch of {embeddings.shape[0]} embeddings"
        )
    import torch  # the caller handed us tensors: torch is loaded already

    if labels.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"labels must be integer class indices, got dtype {labels.dtype}")
