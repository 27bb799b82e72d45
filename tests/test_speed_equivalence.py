"""trainer.compile / channels_last / AMP change the speed, not the training: a few steps of each give the
losses (and weights) of the eager float32 run within the tolerance of its arithmetic."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.data.digits import DigitsData
from marginlab.heads.arcface import ArcFaceHead
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
from marginlab.training.precision import Precision

STEPS = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# torch.compile (inductor) on CPU generates and builds C++ (gcc): on two busy cores ~50 s for the engine test and
# ~85 s for the CLI run (train and eval graphs), over 2 min with a cold inductor cache
SLOW = pytest.mark.skipif(
    not os.environ.get("MARGINLAB_SLOW_TESTS"),
    reason="torch.compile takes minutes on a cold cache: set MARGINLAB_SLOW_TESTS=1",
)


class StepLosses:
    """A RunLog stand-in that keeps each step's loss (the engine logs it every `log_every` steps)."""

    def __init__(self):
        self.losses = []

    def scalars(self, values, step, prefix=""):
        self.losses.append(values["loss"])


@pytest.fixture(scope="module")
def batches():
    data = DigitsData(batch_size=32, seed=0)
    data.setup()
    data.set_epoch(0)
    return [(x.clone(), y.clone()) for (x, y), _ in zip(data.train_loader(), range(STEPS))]


@pytest.fixture(scope="module")
def initial_model():
    torch.manual_seed(0)
    return MarginModel(DigitsCNN(32, 1, 8, width=16), ArcFaceHead(32, 10, s=30.0, m=0.3), nn.ModuleDict())


def train_steps(
    initial_model, batches, device="cpu", precision="32", channels_last=False, compile=False, backend="inductor"
):
    """STEPS optimizer steps through engine.train_one_epoch; (step losses, final parameters on the CPU)."""
    device = torch.device(device)
    model = copy.deepcopy(initial_model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=backend) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    log = StepLosses()
    train_one_epoch(
        StepParts(model, opt, sched, forward=forward),
        batches,
        Precision(device, precision),
        LoopState(),
        LoopOptions(grad_clip=None, max_nonfinite=1, channels_last=channels_last, log_every=1),
        log=log,
    )
    return torch.tensor(log.losses), {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def assert_same_training(result, reference, loss_tol, weight_tol):
    losses, weights = result
    ref_losses, ref_weights = reference
    assert losses.shape == (STEPS,) and torch.isfinite(losses).all()
    rel = ((losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert rel <= loss_tol, f"step losses {losses.tolist()} vs eager float32 {ref_losses.tolist()} (rel. {rel:.2g})"
    for name, ref in ref_weights.items():
        if ref.is_floating_point():
            err = (weights[name] - ref).abs().max().item()
            assert err <= weight_tol * (1 + ref.abs().max().item()), f"{name}: max |diff| {err:.2g}"


@pytest.fixture(scope="module")
def eager_cpu(initial_model, batches):
    return train_steps(initial_model, batches)


def test_the_reference_run_moves_the_weights(initial_model, eager_cpu):
    # the comparisons below are between runs whose steps change the weights well beyond their tolerances
    _, weights = eager_cpu
    moved = max(
        (weights[k] - v.detach()).abs().max().item()
        for k, v in initial_model.state_dict().items()
        if v.is_floating_point()
    )
    assert moved > 0.1


def test_channels_last_on_cpu(initial_model, batches, eager_cpu):
    # trainer.channels_last is only applied on CUDA; forced here: channels_last weights and inputs on the CPU
    assert_same_training(train_steps(initial_model, batches, channels_last=True), eager_cpu, 1e-4, 1e-4)


def test_bf16_autocast_on_cpu(initial_model, batches, eager_cpu):
    # bfloat16 keeps 8 bits of mantissa: the losses agree to 0.2% over 6 steps, the weights to a few percent
    assert_same_training(train_steps(initial_model, batches, precision="bf16"), eager_cpu, 1e-2, 0.1)


def test_compile_wiring_with_aot_eager(initial_model, batches, eager_cpu):
    # dynamo graph capture + AOTAutograd without code generation (seconds, not minutes): the engine runs a
    # torch.compile'd model and the captured graphs compute the eager run's training
    result = train_steps(initial_model, batches, compile=True, backend="aot_eager")
    assert_same_training(result, eager_cpu, 1e-5, 1e-5)


@SLOW
def test_compile_on_cpu(initial_model, batches, eager_cpu):
    assert_same_training(train_steps(initial_model, batches, compile=True), eager_cpu, 1e-4, 1e-4)


@SLOW
def test_trainer_compile_through_the_cli(run_train, metrics):
    eager_code, eager_dir = run_train("logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false")
    code, run_dir = run_train("logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false", "trainer.compile=true")
    assert eager_code == code == 0
    eager, compiled = metrics[0](eager_dir), metrics[0](run_dir)
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
    assert compiled["test/acc"] == pytest.approx(eager["test/acc"], abs=0.01)


# ---- CUDA: the same comparisons against the eager float32 run on the GPU ---------------------------------------
@pytest.fixture(scope="module")
def eager_cuda(initial_model, batches):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return train_steps(initial_model, batches, device="cuda")


@CUDA
def test_cuda_matches_cpu(eager_cuda, eager_cpu):
    assert_same_training(eager_cuda, eager_cpu, 1e-4, 1e-4)


@CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast(initial_model, batches, eager_cuda, precision):
    assert_same_training(train_steps(initial_model, batches, "cuda", precision), eager_cuda, 1e-2, 0.1)


@CUDA
def test_cuda_channels_last(initial_model, batches, eager_cuda):
    assert_same_training(train_steps(initial_model, batches, "cuda", channels_last=True), eager_cuda, 1e-4, 1e-4)


@CUDA
def test_cuda_compile(initial_model, batches, eager_cuda):
    assert_same_training(train_steps(initial_model, batches, "cuda", compile=True), eager_cuda, 1e-4, 1e-4)
