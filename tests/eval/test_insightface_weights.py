"""A bare InsightFace arcface_torch ``.pth`` (their key layout: conv1, bn1, prelu, layer1.0.bn1, ..., fc, features) goes
through ``marginlab embed``, ``export`` and ``eval`` with ``backbone=<name>``, giving the embeddings the same weights
give through ``init_from=``; ``format=insightface`` writes their layout back. The state dict is built here from the
documented layout (arcface_torch ``backbones/iresnet.py``, iresnet18 = layers (2, 2, 2, 2)), at a 32x32 input (their
``fc_scale`` is (H / 16) * (W / 16)) to keep the test fast."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.backbones.iresnet import IResNet
from marginlab.commands.cli import main
from marginlab.errors import DataError
from marginlab.eval.verification import embed_images, evaluate
from marginlab.training.builders import MarginModel
from marginlab.training.weights import init_from, load_backbone

SIZE = 32
SLOW = pytest.mark.skipif(
    not os.environ.get("MARGINLAB_SLOW_TESTS"), reason="ONNX export of an IResNet-18: set MARGINLAB_SLOW_TESTS=1"
)


def insightface_iresnet18_state(size: int = SIZE, seed: int = 0) -> dict:
    """Random weights and BatchNorm statistics under arcface_torch's IResNet key names."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def bn(name, c):
        state.update(
            {
                f"{name}.weight": torch.rand(c, generator=g) + 0.5,
                f"{name}.bias": torch.randn(c, generator=g) * 0.1,
                f"{name}.running_mean": torch.randn(c, generator=g) * 0.1,
                f"{name}.running_var": torch.rand(c, generator=g) * 1.5 + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(0),
            }
        )

    def conv(name, cout, cin, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def prelu(name, c):
        state[f"{name}.weight"] = torch.rand(c, generator=g) * 0.3 + 0.1

    conv("conv1", 64, 3, 3), bn("bn1", 64), prelu("prelu", 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p, cin = f"layer{layer}.{block}", inplanes if block == 0 else planes
            bn(f"{p}.bn1", cin), conv(f"{p}.conv1", planes, cin, 3), bn(f"{p}.bn2", planes)
            prelu(f"{p}.prelu", planes), conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn3", planes)
            if block == 0:  # stride 2: IBasicBlock's downsample = conv1x1 + BN
                conv(f"{p}.downsample.0", planes, cin, 1), bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", 512)
    cells = (size // 16) * (size // 16)
    state["fc.weight"] = torch.randn(512, 512 * cells, generator=g) / (512 * cells) ** 0.5
    state["fc.bias"] = torch.randn(512, generator=g) * 0.1
    bn("features", 512)
    return state


@pytest.fixture
def pth(tmp_path):
    state = insightface_iresnet18_state()
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    return path, state


def via_init_from(path) -> nn.Module:
    model = MarginModel(IResNet(depth=18, image_size=SIZE), nn.Linear(512, 3), nn.ModuleDict())
    init_from(model, path)
    return model.backbone.eval()


def faces(root, face, n: int):
    images = []
    for i in range(n):
        (root / f"id{i}").mkdir(parents=True)
        img = face.image(i, (SIZE, SIZE))
        (root / f"id{i}" / "0.png").write_bytes(face.encode(img))
        images.append(img)
    return images


def error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("marginlab: error: "), err
    return err


def test_embed_a_bare_insightface_pth_gives_the_init_from_embeddings(pth, tmp_path, face, capsys):
    path, _ = pth
    images = faces(tmp_path / "faces", face, 3)
    out = tmp_path / "e.npy"
    assert (
        main(
            [
                "embed",
                f"checkpoint={path}",
                "backbone=iresnet18",
                f"image_size={SIZE}",
                f"input={tmp_path / 'faces'}",
                f"out={out}",
                "flip=false",
            ]
        )
        == 0
    )
    got = np.load(out)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    want = embed_images(via_init_from(path), x, flip=False).numpy()
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_export_a_bare_pth_back_to_insightface_and_to_our_state_dict(pth, tmp_path, face, capsys):
    path, state = pth
    theirs = tmp_path / "again.pth"
    assert (
        main(
            [
                "export",
                f"checkpoint={path}",
                "backbone=iresnet18",
                f"image_size={SIZE}",
                "format=insightface",
                f"out={theirs}",
            ]
        )
        == 0
    )
    back = torch.load(theirs, weights_only=True)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    card = json.loads((tmp_path / "again.pth.json").read_text())
    assert card["weights"]["layout"] == "insightface" and card["input"]["height"] == SIZE
    assert card["input"]["normalisation"]["input_mean"] == [127.5] * 3  # InsightFace's (x - 127.5) / 127.5

    ours = tmp_path / "ours.state_dict.pt"
    assert (
        main(
            [
                "export",
                f"checkpoint={path}",
                "backbone=iresnet18",
                f"image_size={SIZE}",
                "format=state_dict",
                f"out={ours}",
            ]
        )
        == 0
    )
    images = faces(tmp_path / "faces", face, 2)
    out = tmp_path / "e.npy"
    assert main(["embed", f"checkpoint={ours}", f"input={tmp_path / 'faces'}", f"out={out}", "flip=false"]) == 0
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    np.testing.assert_allclose(
        np.load(out), embed_images(via_init_from(path), x, flip=False).numpy(), rtol=1e-5, atol=1e-6
    )  # the sidecar names the backbone and the input


def test_export_of_a_non_iresnet_to_insightface_is_one_line(tmp_path, capsys):
    from hydra.utils import instantiate

    from marginlab.training.weights import backbone_node

    model = instantiate(backbone_node("digits_cnn"), in_channels=3, image_size=SIZE)
    path = tmp_path / "digits.pth"
    torch.save(model.state_dict(), path)
    capsys.readouterr()
    assert (
        main(["export", f"checkpoint={path}", "backbone=digits_cnn", f"image_size={SIZE}", "format=insightface"]) == 2
    )
    assert "format=insightface is for IResNet backbones" in error(capsys)


def test_eval_a_bare_pth(pth, tmp_path, face, capsys):
    path, _ = pth
    images = [face.image(10 + i, (SIZE, SIZE)) for i in range(8)]
    issame = [True, False, True, False]
    lfw = tmp_path / "lfw.bin"
    lfw.write_bytes(face.py2_bin_pickle([face.encode(im) for im in images], issame))
    assert (
        main(
            [
                "eval",
                f"checkpoint={path}",
                "backbone=iresnet18",
                f"image_size=[{SIZE},{SIZE}]",
                "verification=[lfw]",
                f"verification.lfw.path={lfw}",
                "verification.lfw.nfolds=2",
                "flip=false",
            ]
        )
        == 0
    )
    merged = json.loads((tmp_path / "backbone.eval.json").read_text())
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    emb = embed_images(via_init_from(path), x, flip=False).numpy()
    want = evaluate(emb[0::2], emb[1::2], np.array(issame), nfolds=2)
    assert merged["lfw/auc"] == pytest.approx(want["auc"]) and merged["lfw/acc"] == pytest.approx(want["accuracy"])
    record = json.loads((tmp_path / merged["files"]["lfw"]).read_text())
    assert record["weights"]["layout"] == "insightface" and record["weights"]["file"] == str(path)


def test_bare_pth_errors_are_one_line(pth, tmp_path, capsys):
    path, _ = pth
    (tmp_path / "faces" / "a").mkdir(parents=True)
    embed = ["embed", f"checkpoint={path}", f"input={tmp_path / 'faces'}", f"out={tmp_path / 'e.npy'}"]
    cases = [
        (embed, f"{path} is a bare state dict (no config names its architecture): give backbone=<name>"),
        (
            [*embed, "backbone=iresnet34", f"image_size={SIZE}"],
            f"{path} does not fit backbone=iresnet34 at a 32x32 input (",
        ),
        (
            [*embed, "backbone=iresnet18"],
            f"{path} does not fit backbone=iresnet18 at a 112x112 input (1 difference, e.g. fc.weight",
        ),
        ([*embed, "backbone=nope"], "backbone='nope' is not allowed: choose one of digits_cnn, iresnet100"),
        (["export", f"checkpoint={path}", "format=state_dict"], "give backbone=<name>"),
        (["eval", f"checkpoint={path}", "verification=[lfw]"], "give backbone=<name>"),
        (
            ["eval", f"checkpoint={path}", "verification=[lfw]", "backbone=iresnet50", f"image_size={SIZE}"],
            "does not fit backbone",
        ),
        ([*embed, "backbone=iresnet18", "image_size=big"], "image_size='big' is not allowed"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        assert message in error(capsys)
    assert not (tmp_path / "e.npy").exists()


@SLOW
def test_onnx_export_of_a_bare_pth(pth, tmp_path):
    path, _ = pth
    assert (
        main(["export", f"checkpoint={path}", "backbone=iresnet18", f"image_size={SIZE}", f"out={tmp_path / 'm.onnx'}"])
        == 0
    )
    assert json.loads((tmp_path / "m.onnx.json").read_text())["check"]["max_relative_error"] <= 1e-4


def test_a_pth_without_batchnorm_step_counters_loads(tmp_path):

    state = {k: v for k, v in insightface_iresnet18_state().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    backbone, ckpt, _ = load_backbone(tmp_path / "old.pth", backbone="iresnet18", image_size=SIZE)
    assert ckpt["weights"]["layout"] == "insightface" and isinstance(backbone, IResNet)
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])


def test_a_state_dict_that_fits_neither_layout_is_one_line_naming_its_first_unmatched_keys(tmp_path, capsys):
    from marginlab.backbones.insightface_keys import mobilefacenet_to_insightface
    from marginlab.backbones.mobilefacenet import MobileFaceNet

    theirs, left = mobilefacenet_to_insightface(MobileFaceNet().state_dict(), (1, 4, 6, 2))
    assert not left and "conv_sep.layers.0.weight" in theirs
    path = tmp_path / "net.pth"  # every key under a prefix no layout knows
    torch.save({f"net.{k}": v for k, v in theirs.items()}, path)
    (tmp_path / "faces" / "a").mkdir(parents=True)
    capsys.readouterr()
    assert (
        main(
            [
                "embed",
                f"checkpoint={path}",
                "backbone=mobilefacenet",
                f"input={tmp_path / 'faces'}",
                f"out={tmp_path / 'e.npy'}",
            ]
        )
        == 2
    )
    assert (
        f"{path} does not fit backbone=mobilefacenet at a 112x112 input (2 differences, e.g. 283 of its 283 keys, "
        f"neither marginlab's nor InsightFace's names of the model's tensors: net.layers.0.layers.0.weight, "
        f"net.layers.0.layers.1.weight, net.layers.0.layers.1.bias, ...; 283 of the model's 283 tensors not "
        f"in it: features.0.0.weight,"
    ) in error(capsys)
    model = MarginModel(MobileFaceNet(), nn.Linear(128, 3), nn.ModuleDict())
    with pytest.raises(
        DataError,
        match=rf"^{path}: none of its 333 tensors fits .* not a checkpoint of this "
        rf"architecture \(283 of its 283 keys, .*: backbone\.net\.layers\.0\.",
    ):
        init_from(model, path)


def test_a_state_dict_saved_from_a_data_parallel_wrapper_loads_without_its_module_prefix(tmp_path):
    from marginlab.backbones.insightface_keys import mobilefacenet_to_insightface
    from marginlab.backbones.mobilefacenet import MobileFaceNet

    torch.manual_seed(0)
    net = MobileFaceNet().eval()
    theirs, _ = mobilefacenet_to_insightface(net.state_dict(), (1, 4, 6, 2))
    path = tmp_path / "ddp.pth"  # torch.save(DistributedDataParallel(model).state_dict()): every key under "module."
    torch.save({f"module.{k}": v for k, v in theirs.items()}, path)
    backbone, ckpt, _ = load_backbone(path, backbone="mobilefacenet")
    assert ckpt["weights"]["data_parallel_prefix"] and ckpt["weights"]["layout"] == "insightface"
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(backbone(x), net(x), rtol=0, atol=0)
    model = MarginModel(MobileFaceNet(), nn.Linear(128, 3), nn.ModuleDict())
    assert "loaded backbone" in init_from(model, path)
    torch.testing.assert_close(model.backbone.eval()(x), net(x), rtol=0, atol=0)
