"""``marginlab export``: every backbone to ONNX (checked under onnxruntime), TorchScript and state dicts; the sidecar
tells the truth about the input; files are never overwritten; failures are one line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from marginlab.commands.cli import main
from marginlab.data.face import normalize_face

ort = pytest.importorskip("onnxruntime")

CONFIGS = Path(__file__).resolve().parents[1] / "marginlab" / "configs" / "backbone"
FACE = "marginlab.data.face.casia.CasiaData"
#: backbone config -> (channels, image size, data set) at the smallest size each architecture takes
FACE_BACKBONES = {
    name: (3, 16, FACE)
    for name in (
        "sfnet4",
        "sfnet10",
        "sfnet20",
        "sfnet36",
        "sfnet64",
        "iresnet18",
        "iresnet34",
        "iresnet50",
        "iresnet100",
        "mobilefacenet",
        "mbf",
        "mbf_large",
    )
}
CLASSIFICATION_BACKBONES = {
    "digits_cnn": (1, 8, "marginlab.data.digits.DigitsData"),
    "lenet_pp": (1, 28, "marginlab.data.torchvision_sets.MNISTData"),
    "lsoftmax_mnist": (1, 28, "marginlab.data.torchvision_sets.MNISTData"),
    "normface_lenet": (1, 28, "marginlab.data.torchvision_sets.MNISTData"),
    "lsoftmax_cifar10": (3, 32, "marginlab.data.torchvision_sets.CIFAR10Data"),
    "lsoftmax_cifar100": (3, 32, "marginlab.data.torchvision_sets.CIFAR100Data"),
    "resnet20": (3, 32, "marginlab.data.torchvision_sets.CIFAR10Data"),
    "resnet18": (3, 32, "marginlab.data.imagenet.ImageNetData"),
    "resnet50": (3, 32, "marginlab.data.imagenet.ImageNetData"),
}
BACKBONES = {**FACE_BACKBONES, **CLASSIFICATION_BACKBONES}
#: deeper variants of the classes above (20-65M parameters, 20-80 s each on two busy cores): opt-in
DEEP = ("iresnet34", "iresnet50", "iresnet100", "sfnet36", "sfnet64", "resnet50", "mbf", "mbf_large")
SLOW = pytest.mark.skipif(
    not os.environ.get("MARGINLAB_SLOW_TESTS"),
    reason="a deep variant of a backbone class exported above: set MARGINLAB_SLOW_TESTS=1",
)


def test_every_backbone_config_is_covered():
    assert sorted(BACKBONES) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def make_checkpoint(directory: Path, backbone: str, channels: int, size, dataset: str, **backbone_overrides):
    """A marginlab checkpoint (as train.py writes it) of a randomly initialised ``backbone``; its BatchNorm
    statistics come from a few random batches, as after training (the raw init overflows in deep IResNets)."""
    torch.manual_seed(0)
    node = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{backbone}.yaml"), backbone_overrides)
    model = instantiate(node, in_channels=channels, image_size=size)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, channels, *hw) * 2 - 1)
    config = {
        "backbone": OmegaConf.to_container(node),
        "dataset": {"_target_": dataset, "image_size": size},
        "head": {"_target_": "marginlab.heads.arcface.ArcFace", "s": 64.0, "m": 0.5},
    }
    ckpt = {
        "model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
        "config": config,
        "data": {"in_channels": channels, "image_size": size, "num_classes": 5},
        "state": {"epoch": 3},
    }
    path = directory / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path, model.eval()


def run(*args: str) -> int:
    return main(list(args))


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=SLOW) if b in DEEP else b for b in sorted(BACKBONES)])
def test_backbone_exports_to_onnx_and_matches_torch(backbone, tmp_path, capsys):
    channels, size, dataset = BACKBONES[backbone]
    ckpt, model = make_checkpoint(tmp_path, backbone, channels, size, dataset)
    assert run("export", f"checkpoint={tmp_path}") == 0
    onnx_path = ckpt.with_name("best.onnx")
    assert f"wrote {onnx_path}" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (_,) = session.get_inputs(), session.get_outputs()  # one output
    assert inp.shape[1:] == [channels, size, size] and isinstance(inp.shape[0], str)  # dynamic batch axis
    x = torch.rand(5, channels, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    got = session.run(None, {inp.name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert len(got) == 1 and got[0].shape == want.shape
    assert relative_error(got[0], want) <= 1e-4
    card = json.loads(Path(f"{onnx_path}.json").read_text())
    assert card["input"]["shape"] == ["N", channels, size, size]
    assert card["output"]["embedding_size"] == want.shape[1] == model.embedding_dim
    assert card["backbone"]["_target_"] == OmegaConf.load(CONFIGS / f"{backbone}.yaml")._target_
    assert card["head"]["_target_"] == "marginlab.heads.arcface.ArcFace" and card["dataset"]["_target_"] == dataset
    assert card["check"]["max_relative_error"] <= 1e-4
    if dataset == FACE:  # 16x16 here: InsightFace's router wants at least 112, square, a multiple of 16
        assert card["check"]["insightface_recognition_model"] is False


@pytest.mark.parametrize(
    "dataset,channels",
    [
        (FACE, 3),
        ("marginlab.data.torchvision_sets.MNISTData", 1),
        ("marginlab.data.torchvision_sets.CIFAR10Data", 3),
        ("marginlab.data.imagenet.ImageNetData", 3),
    ],
)
def test_sidecar_normalisation_is_what_the_data_pipeline_does(dataset, channels, tmp_path):
    from hydra.utils import get_class

    make_checkpoint(tmp_path, "digits_cnn", channels, 8, dataset)
    assert run("export", f"checkpoint={tmp_path}", "format=state_dict") == 0
    card = json.loads((tmp_path / "checkpoints" / "best.state_dict.pt.json").read_text())
    norm = card["input"]["normalisation"]
    pixels = torch.randint(0, 256, (2, channels, 4, 4), dtype=torch.uint8)
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    recorded = (pixels.float() / norm["pixel_max"] - mean) / std
    if dataset == FACE:
        assert card["input"]["colour_order"] == "RGB" and norm["input_mean"] == [127.5] * 3
        expected = normalize_face(pixels)
    else:
        from torchvision.transforms import functional as TF

        cls = get_class(dataset)
        if dataset.endswith("ImageNetData"):
            from marginlab.data.imagenet import MEAN as cls_mean
            from marginlab.data.imagenet import STD as cls_std
        else:
            cls_mean, cls_std = cls.mean, cls.std
        expected = TF.normalize(pixels.float() / 255, cls_mean, cls_std)
    torch.testing.assert_close(recorded, expected)


def test_torchscript_and_state_dict_exports_compute_the_backbone(tmp_path):
    ckpt, model = make_checkpoint(tmp_path, "digits_cnn", 1, 8, "marginlab.data.digits.DigitsData")
    assert run("export", f"checkpoint={ckpt}", "format=torchscript") == 0
    assert run("export", f"checkpoint={ckpt}", "format=state_dict") == 0
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.load(str(ckpt.with_name("best.torchscript.pt")))(x), want)
    card = json.loads(ckpt.with_name("best.state_dict.pt.json").read_text())
    rebuilt = instantiate(card["backbone"], in_channels=card["input"]["channels"], image_size=card["input"]["height"])
    rebuilt.load_state_dict(torch.load(ckpt.with_name("best.state_dict.pt"), weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), want)
    assert card["input"]["normalisation"]["formula"] == "(pixel / 16 - mean[c]) / std[c]"


def test_export_never_overwrites(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path, "digits_cnn", 1, 8, "marginlab.data.digits.DigitsData")
    assert run("export", f"checkpoint={ckpt}", "format=state_dict") == 0
    first = ckpt.with_name("best.state_dict.pt").read_bytes()
    capsys.readouterr()
    assert run("export", f"checkpoint={ckpt}", "format=state_dict") == 0  # default name taken: a new one
    out = capsys.readouterr().out
    assert "best.state_dict.pt exists; writing best-1.state_dict.pt instead" in out
    assert ckpt.with_name("best-1.state_dict.pt").is_file() and ckpt.with_name("best-1.state_dict.pt.json").is_file()
    assert ckpt.with_name("best.state_dict.pt").read_bytes() == first
    given = tmp_path / "model.pt"
    given.write_text("mine")
    assert run("export", f"checkpoint={ckpt}", "format=state_dict", f"out={given}") == 2  # a given name: refused
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"marginlab: error: {given} exists")
    assert given.read_text() == "mine" and not Path(f"{given}.json").exists()


def _fft_forward(self, x):
    return torch.fft.fft2(x).abs().flatten(1)  # no ONNX symbolic for aten::fft_fft2


def _constant_forward(self, x):  # the numpy detour is traced as a constant: right for the traced batch only
    return x.flatten(1)[:, :1] * 0 + torch.tensor([[float(np.asarray(x.detach()).sum())]])


@pytest.mark.parametrize(
    "forward,message",
    [
        (
            _fft_forward,
            "backbone marginlab.backbones.digits_cnn.DigitsCNN cannot be exported to ONNX (UnsupportedOperatorError",
        ),
        (_constant_forward, "differs from PyTorch by"),
    ],
)
def test_a_backbone_that_does_not_export_faithfully_fails_in_one_line(forward, message, tmp_path, monkeypatch, capfd):
    from marginlab.backbones.digits_cnn import DigitsCNN

    ckpt, _ = make_checkpoint(tmp_path, "digits_cnn", 1, 8, "marginlab.data.digits.DigitsData")
    monkeypatch.setattr(DigitsCNN, "forward", forward)
    capfd.readouterr()
    assert run("export", f"checkpoint={ckpt}") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("marginlab: error: ") and message in err[-1]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]  # nothing kept, no temp file left


def test_export_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    assert run("export", f"checkpoint={bad}") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"marginlab: error: {bad}: not a loadable checkpoint")
    assert run("export", f"checkpoint={bad}", "format=tflite") == 2
    assert "format='tflite' is not allowed: choose one of onnx, torchscript, state_dict" in capsys.readouterr().err


def test_insightface_loads_the_face_export_as_a_recognition_model(tmp_path):
    """InsightFace's ``model_zoo.get_model`` routes the export to ``ArcFaceONNX`` (112x112 input), infers the
    (x - 127.5) / 127.5 normalisation and, from BGR images as cv2 reads them, gives marginlab's embeddings."""
    model_zoo = pytest.importorskip("insightface.model_zoo")
    ckpt, model = make_checkpoint(tmp_path, "mobilefacenet", 3, 112, FACE)
    assert run("export", f"checkpoint={ckpt}") == 0
    card = json.loads(ckpt.with_name("best.onnx.json").read_text())
    assert card["check"]["insightface_recognition_model"] is True and card["check"]["insightface_problems"] == []
    recogniser = model_zoo.get_model(str(ckpt.with_name("best.onnx")), providers=["CPUExecutionProvider"])
    assert isinstance(recogniser, model_zoo.ArcFaceONNX) and recogniser.taskname == "recognition"
    assert (recogniser.input_mean, recogniser.input_std, recogniser.input_size) == (127.5, 127.5, (112, 112))
    recogniser.prepare(ctx_id=-1)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    got = recogniser.get_feat([np.ascontiguousarray(img[:, :, ::-1]) for img in rgb])  # BGR, as cv2.imread gives
    with torch.no_grad():
        want = model(normalize_face(torch.from_numpy(rgb).permute(0, 3, 1, 2))).numpy()
    assert relative_error(got, want) <= 1e-4
