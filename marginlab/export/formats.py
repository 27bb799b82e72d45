"""The export formats: each writes the backbone (fp32, eval mode) to a file, then reads that file back and checks
it computes what the PyTorch backbone computes on a random batch, or raises ExportError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from marginlab.errors import ConfigError, ExportError
from marginlab.training.checkpoint import read_checkpoint

TOLERANCE = 1e-4  # max |exported - torch| / max |torch| on the check batch
CHECK_BATCH = 3  # not the traced batch size (2): the batch axis must really be dynamic
OPSET = 17
INPUT, OUTPUT = "input", "embedding"


def random_batch(n: int, shape, seed: int) -> Tensor:
    """``n`` inputs uniform in [-1, 1] (the range of normalised images), the same for a given ``seed``."""
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def _compare(got: np.ndarray, want: Tensor, what: str, name: str) -> float:
    want = want.detach().numpy()
    if not np.isfinite(want).all():
        raise ExportError(
            f"{name}: PyTorch's own output on a random batch in [-1, 1] is not finite (non-finite "
            f"weights, or activations that overflow); nothing to check the export against"
        )
    if got.shape != want.shape:
        raise ExportError(
            f"{name}: the {what} gives an output of shape {list(got.shape)}, PyTorch "
            f"{list(want.shape)}; the export is not kept"
        )
    error = relative_error(got, want)
    if not error <= TOLERANCE:
        raise ExportError(
            f"{name}: the {what} differs from PyTorch by {error:.2e} (relative, more than "
            f"{TOLERANCE:g}) on a random batch; the export is not kept"
        )
    return error


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def write_onnx(backbone: nn.Module, example: Tensor, path: Path, name: str) -> dict:
    """ONNX (opset 17, fp32 weights), input ``[N, C, H, W]`` with a dynamic batch axis, one output ``[N, D]``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "format=onnx needs onnxruntime to check the export: pip install 'marginlab[export]'"
        ) from None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
            # dynamo=False: the TorchScript-based exporter needs no onnxscript and takes 2-5x less time here
            torch.onnx.export(
                backbone,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except OSError:
        raise  # the file, not the model: files.staged names it
    except Exception as exc:  # an operation the tracer or the exporter does not support
        raise ExportError(f"{name} cannot be exported to ONNX ({_first_line(exc)})") from None
    batch = random_batch(CHECK_BATCH, example.shape[1:], seed=1)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{name}: onnxruntime cannot load the exported model ({_first_line(exc)})") from None
    if len(session.get_inputs()) != 1:
        raise ExportError(
            f"{name}: the exported model has {len(session.get_inputs())} inputs, not one (an output "
            f"traced as a constant does not depend on the image)"
        )
    try:
        outputs = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    except Exception as exc:
        raise ExportError(f"{name}: onnxruntime cannot run the exported model ({_first_line(exc)})") from None
    if len(outputs) != 1:
        raise ExportError(f"{name}: the exported model has {len(outputs)} outputs, not one")
    with torch.no_grad():
        error = _compare(outputs[0], backbone(batch), "ONNX model under onnxruntime", name)
    return {
        "max_relative_error": error,
        "tolerance": TOLERANCE,
        "batch": CHECK_BATCH,
        "runtime": f"onnxruntime {ort.__version__}",
        "opset": OPSET,
    }


def write_torchscript(backbone: nn.Module, example: Tensor, path: Path, name: str) -> dict:
    """``torch.jit.trace`` of the backbone (``torch.jit.load`` reads it without marginlab)."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(backbone, example, check_trace=False)
            torch.jit.save(traced, str(path))
            loaded = torch.jit.load(str(path), map_location="cpu")
    except OSError:
        raise  # the file, not the model: files.staged names it
    except Exception as exc:
        raise ExportError(f"{name} cannot be exported to TorchScript ({_first_line(exc)})") from None
    batch = random_batch(CHECK_BATCH, example.shape[1:], seed=1)
    with torch.no_grad():
        error = _compare(loaded(batch).numpy(), backbone(batch), "TorchScript model", name)
    return {
        "max_relative_error": error,
        "tolerance": TOLERANCE,
        "batch": CHECK_BATCH,
        "runtime": f"torch {torch.__version__}",
    }


def write_state_dict(backbone: nn.Module, example: Tensor, path: Path, name: str) -> dict:
    """The backbone's ``state_dict`` (tensors only: ``torch.load(weights_only=True)`` reads it); the sidecar's
    ``backbone`` entry rebuilds the module (``hydra.utils.instantiate``), ``init_from=`` takes it as it is."""
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    torch.save(state, path)
    saved = read_checkpoint(path, required=())
    if set(saved) != set(state) or any(not torch.equal(saved[k], v) for k, v in state.items()):
        raise ExportError(f"{name}: the state dict read back from {path} differs from the backbone's")
    return {"max_relative_error": 0.0, "tolerance": 0.0, "runtime": f"torch {torch.__version__}"}


def write_insightface(backbone: nn.Module, example: Tensor, path: Path, name: str) -> dict:
    """An IResNet's or a MobileFaceNet's state dict under InsightFace arcface_torch's key names
    (``marginlab.export.insightface``, ``backbones.insightface_keys.mobilefacenet_to_insightface``): what their
    ``iresnet50().load_state_dict`` / ``get_mbf(...).load_state_dict`` takes; read back and mapped to ours again, it
    must be the backbone's."""
    from marginlab.backbones.insightface_keys import from_insightface, mobilefacenet_to_insightface
    from marginlab.backbones.iresnet import IResNet
    from marginlab.backbones.mobilefacenet import MobileFaceNet
    from marginlab.export.insightface import to_insightface

    if not isinstance(backbone, (IResNet, MobileFaceNet)):
        raise ConfigError(
            f"format=insightface is for IResNet backbones (iresnet18/34/50/100) and MobileFaceNets "
            f"(mobilefacenet, mbf, mbf_large: InsightFace's key layouts), not {name}: choose "
            f"format=state_dict"
        )
    ours = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    iresnet = isinstance(backbone, IResNet)
    theirs, left = to_insightface(ours) if iresnet else mobilefacenet_to_insightface(ours, backbone.blocks)
    if left:
        raise ExportError(f"{name}: {len(left)} tensors have no InsightFace name ({', '.join(left[:3])}); not written")
    torch.save(theirs, path)
    back = from_insightface(read_checkpoint(path, required=()))
    if set(back) != set(ours) or any(not torch.equal(back[k], v) for k, v in ours.items()):
        raise ExportError(f"{name}: the InsightFace state dict read back from {path} differs from the backbone's")
    return {
        "max_relative_error": 0.0,
        "tolerance": 0.0,
        "runtime": f"torch {torch.__version__}",
        "key_layout": f"insightface arcface_torch backbones/{'iresnet' if iresnet else 'mobilefacenet'}.py",
    }


#: format -> (file suffix, writer)
FORMATS = {
    "onnx": (".onnx", write_onnx),
    "torchscript": (".torchscript.pt", write_torchscript),
    "state_dict": (".state_dict.pt", write_state_dict),
    "insightface": (".insightface.pth", write_insightface),
}


def insightface_problems(path: Path, height: int, width: int) -> list[str]:
    """Why InsightFace's ``model_zoo.get_model`` would not load an ONNX file as a recognition model (``ModelRouter``:
    a square input of at least 112 and a multiple of 16, one output; ``ArcFaceONNX`` takes a model whose first
    eight nodes include both a Sub and a Mul for an MXNet model with the normalisation built in)."""
    problems = []
    if height != width or height < 112 or height % 16:
        problems.append(
            f"input {height}x{width}: insightface routes only square inputs of at least 112 and a "
            "multiple of 16 to ArcFaceONNX"
        )
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except ImportError:
        return problems
    names = [node.name for node in graph.node[:8]]
    if any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names):
        problems.append(
            "its first nodes are named Sub and Mul: insightface would take it for an MXNet model and "
            "skip the (x - 127.5) / 127.5 normalisation"
        )
    if len(graph.output) != 1:
        problems.append(f"{len(graph.output)} outputs (insightface wants one)")
    return problems
