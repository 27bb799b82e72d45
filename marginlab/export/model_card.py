"""The JSON sidecar of an exported backbone: what its input must be, what it outputs, where it came from."""

from __future__ import annotations

import torch

from marginlab.checks import image_hw

FACE_DATA = "marginlab.data.face."


def _normalisation(pixel_max: float, mean, std, note: str) -> dict:
    return {
        "formula": f"(pixel / {pixel_max:g} - mean[c]) / std[c]",
        "pixel_max": pixel_max,
        "mean": list(mean),
        "std": list(std),
        "input_mean": [round(m * pixel_max, 6) for m in mean],
        "input_std": [round(s * pixel_max, 6) for s in std],
        "note": note,
    }


def is_face_model(ckpt: dict) -> bool:
    """Trained on a face data set (``marginlab.data.face.*``), or a bare state dict taken for InsightFace's."""
    target = str((ckpt["config"].get("dataset") or {}).get("_target_", ""))
    return target.startswith(FACE_DATA) or bool((ckpt.get("weights") or {}).get("face"))


def preprocessing(dataset: dict, channels: int, face: bool = False) -> dict:
    """The normalisation marginlab's data pipeline applied for the checkpoint's data set (``dataset._target_``);
    ``face``: InsightFace's face crops (a bare state dict names no data set)."""
    target = str(dataset.get("_target_", ""))
    if face or target.startswith(FACE_DATA):  # marginlab.data.face.normalize_face
        return _normalisation(
            255,
            [0.5] * channels,
            [0.5] * channels,
            "an aligned face crop, RGB, (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5 in [-1, 1] "
            "(InsightFace's); a crop of another size is first fitted as marginlab.data.face.fit_face",
        )
    if target == "marginlab.data.digits.DigitsData":
        return _normalisation(16, [0.5], [0.5], "scikit-learn's 8x8 digits: pixel values 0..16")
    try:
        from hydra.utils import get_class

        cls = get_class(target)
    except Exception:  # a data set marginlab cannot import here: say so rather than guess
        return {"formula": None, "note": f"unknown: the transform of {target or 'the data set'}"}
    from marginlab.data.imagenet import MEAN, STD, ImageNetData

    if issubclass(cls, ImageNetData):
        size = int(dataset.get("image_size", 224))
        return _normalisation(
            255,
            MEAN,
            STD,
            f"torchvision ToTensor + Normalize, after resizing the shorter side to "
            f"{round(256 * size / 224)} and a centre crop of {size}",
        )
    mean, std = getattr(cls, "mean", None), getattr(cls, "std", None)
    if mean is None or std is None:
        return {"formula": None, "note": f"unknown: the transform of {target}"}
    return _normalisation(255, mean, std, "torchvision ToTensor + Normalize")


def model_card(fmt: str, file: str, ckpt: dict, source: str, embedding_size: int, check: dict) -> dict:
    """The sidecar of an export of ``ckpt``'s backbone to ``file``."""
    from marginlab import __version__

    data, config = ckpt["data"], ckpt["config"]
    channels = int(data["in_channels"])
    height, width = image_hw(data["image_size"])
    colour = {1: "grey", 3: "RGB"}.get(channels, f"{channels} channels")
    return {
        "format": fmt,
        "file": file,
        "source": source,
        "epoch": ckpt.get("state", {}).get("epoch"),
        "input": {
            "name": "input",
            "layout": "NCHW",
            "shape": ["N", channels, height, width],
            "dtype": "float32",
            "channels": channels,
            "height": height,
            "width": width,
            "colour_order": colour,
            "normalisation": preprocessing(config.get("dataset") or {}, channels, is_face_model(ckpt)),
        },
        "output": {
            "name": "embedding",
            "shape": ["N", embedding_size],
            "embedding_size": embedding_size,
            "l2_normalised": False,
        },
        "backbone": config.get("backbone"),
        "head": config.get("head"),
        "dataset": config.get("dataset"),
        "num_classes": data.get("num_classes"),
        "check": check,
        **({"weights": ckpt["weights"]} if "weights" in ckpt else {}),
        "versions": {"marginlab": __version__, "torch": torch.__version__},
    }
