"""The in-memory data path: batches sliced from one device tensor, augmented and normalised as batched ops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from marginlab.data.digits import DigitsData
from marginlab.data.in_memory import (
    InMemoryLoader,
    augmentation_params,
    horizontal_flip,
    in_memory_loader,
    random_crop,
    to_uint8_tensors,
)
from marginlab.data.torchvision_sets import CIFAR10Data, MNISTData
from marginlab.errors import ConfigError


def uint8_images(n=10, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def pattern(h=4, w=5):
    """One 1 x h x w image whose pixel (r, c) is 10 r + c + 1 (so no pixel is 0)."""
    return (10 * torch.arange(h).view(h, 1) + torch.arange(w).view(1, w) + 1).to(torch.uint8).view(1, 1, h, w)


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def fake_cifar_module(tmp_path, n=12, augment=True, batch_size=5):
    rng = np.random.default_rng(0)
    data = CIFAR10Data(root=str(tmp_path), download=False, augment=augment, batch_size=batch_size, seed=3)
    data.train_set = SimpleNamespace(
        data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), targets=[i % 10 for i in range(n)]
    )
    data.test_set = SimpleNamespace(
        data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), targets=[i % 10 for i in range(n)]
    )
    return data


# ---- shapes, order, determinism --------------------------------------------------------------------------
@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batch_shapes_and_dtypes(drop_last, sizes):
    loader = InMemoryLoader(
        uint8_images(),
        torch.arange(10),
        4,
        drop_last=drop_last,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        crop_padding=2,
        flip=True,
    )
    batches = collect(loader)
    assert len(loader) == len(batches) == len(sizes)
    for (x, y), size in zip(batches, sizes):
        assert x.shape == (size, 3, 8, 8) and x.dtype == torch.float32
        assert y.shape == (size,) and y.dtype == torch.int64


def test_every_sample_is_seen_once_per_epoch():
    loader = InMemoryLoader(uint8_images(n=23), torch.arange(23), 5, crop_padding=1, flip=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        labels = torch.cat([y for _, y in loader])
        assert torch.equal(labels.sort().values, torch.arange(23))


def test_order_and_augmentation_are_a_function_of_seed_and_epoch():
    make = lambda seed: InMemoryLoader(uint8_images(n=16), torch.arange(16), 4, seed=seed, crop_padding=2, flip=True)
    a, b = make(7), make(7)
    a.set_epoch(3)
    first = collect(a)
    collect(a)  # another epoch in between, as before a resume
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(first, collect(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(3)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, collect(a)))
    a.set_epoch(4)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in collect(a)]))
    c = make(8)
    c.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in collect(c)]))


@pytest.mark.parametrize("n", [12, 9])
def test_data_parallel_ranks_split_each_global_batch(n):
    make = lambda **kw: InMemoryLoader(uint8_images(n=n), torch.arange(n), 4, seed=5, crop_padding=2, flip=True, **kw)
    single, ranks = make(), [make(rank=r, world_size=2) for r in range(2)]
    for loader in (single, *ranks):
        loader.set_epoch(1)
    per_rank = [collect(loader) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(math.ceil(n / 2) / 2)  # batches of 2 per rank
    assert all(x.shape[0] <= 2 for batches in per_rank for x, _ in batches)
    seen = torch.cat([y for batches in per_rank for _, y in batches])
    assert set(seen.tolist()) == set(range(n)) and seen.numel() == 2 * -(-n // 2)  # padded like DistributedSampler
    if n % 4 == 0:  # the union of the ranks' k-th batches is the single process's k-th batch, augmentation included
        for (x, y), (x0, y0), (x1, y1) in zip(collect(single), *per_rank):
            assert torch.equal(y.sort().values, torch.cat([y0, y1]).sort().values)
            assert torch.equal(x[y.argsort()], torch.cat([x0, x1])[torch.cat([y0, y1]).argsort()])
    with pytest.raises(ConfigError, match="divide evenly"):
        InMemoryLoader(uint8_images(), torch.arange(10), 5, world_size=2)


def test_evaluation_order_is_sequential_and_unaugmented():
    images = uint8_images(n=7)
    loader = InMemoryLoader(images, torch.arange(7), 3, shuffle=False, crop_padding=4, flip=True)
    x = torch.cat([x for x, _ in loader])
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(7))
    assert torch.allclose(x, images.float() / 255)


# ---- augmentation on hand-made images --------------------------------------------------------------------
def test_horizontal_flip_of_a_known_pattern():
    img = pattern().expand(2, 1, 4, 5)
    out = horizontal_flip(img, torch.tensor([True, False]))
    assert out[0, 0, 2].tolist() == [25, 24, 23, 22, 21]
    assert torch.equal(out[0, 0], img[0, 0, :, [4, 3, 2, 1, 0]])
    assert torch.equal(out[1], img[1])


def test_random_crop_zero_fills_the_border():
    img = pattern().expand(3, 1, 4, 5)
    out = random_crop(img, 2, torch.tensor([[2, 2], [0, 0], [4, 3]]))
    assert torch.equal(out[0], img[0])  # offset = padding: the image itself
    # offset (0, 0): the image moves 2 down and 2 right, zeros enter at the top and left
    assert (out[1, 0, :2] == 0).all() and (out[1, 0, :, :2] == 0).all()
    assert torch.equal(out[1, 0, 2:, 2:], img[1, 0, :2, :3])
    # offset (4, 3): 2 up and 1 left, zeros at the bottom and right
    assert (out[2, 0, 2:] == 0).all() and (out[2, 0, :, 4:] == 0).all()
    assert torch.equal(out[2, 0, :2, :4], img[2, 0, 2:, 1:])


def test_batched_augmentation_matches_per_sample_crop_and_flip():
    images = uint8_images(n=32, c=3, h=6, w=7)
    loader = InMemoryLoader(images, torch.arange(32), 32, crop_padding=3, flip=True, seed=1)
    loader.set_epoch(5)
    order, offsets, flips = loader.epoch_plan()
    loader.set_epoch(5)
    ((x, y),) = collect(loader)
    assert torch.equal(y, order)
    for i, k in enumerate(order.tolist()):
        padded = F.pad(images[k], (3, 3, 3, 3))
        r, c = offsets[i].tolist()
        crop = padded[:, r : r + 6, c : c + 7]
        if flips[i]:
            crop = crop.flip(2)
        assert torch.allclose(x[i], crop.float() / 255, atol=1e-6)
    assert flips.any() and (~flips).any() and len(set(map(tuple, offsets.tolist()))) > 1


# ---- normalisation and the data modules ------------------------------------------------------------------
def test_normalisation_values():
    img = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    loader = InMemoryLoader(img, torch.zeros(1, dtype=torch.long), 1, shuffle=False, mean=(0.5,), std=(0.25,))
    ((x, _),) = collect(loader)
    expected = (torch.tensor([0, 128, 255]) / 255.0 - 0.5) / 0.25
    assert torch.allclose(x.flatten(), expected, atol=1e-6)


def test_to_uint8_tensors_reads_mnist_and_cifar_layouts():
    mnist = SimpleNamespace(data=torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), targets=torch.arange(4))
    images, labels = to_uint8_tensors(mnist)
    assert images.shape == (4, 1, 28, 28) and torch.equal(images[:, 0], mnist.data) and labels.dtype == torch.int64
    cifar = SimpleNamespace(
        data=np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), targets=[1, 2, 3]
    )
    images, labels = to_uint8_tensors(cifar)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [1, 2, 3]
    assert torch.equal(images[1, 2], torch.from_numpy(cifar.data[1, :, :, 2]))
    with pytest.raises(ConfigError, match="uint8"):
        to_uint8_tensors(SimpleNamespace(data=np.zeros((2, 4, 4), np.float32), targets=[0, 1]))


def test_matches_torchvision_transforms_without_augmentation(tmp_path):
    data = fake_cifar_module(tmp_path)
    loader = in_memory_loader(data, "test", device="cpu")
    x = torch.cat([x for x, _ in loader])
    tf = T.Compose([T.ToTensor(), T.Normalize(data.mean, data.std)])
    from PIL import Image

    ref = torch.stack([tf(Image.fromarray(img)) for img in data.test_set.data])
    assert torch.allclose(x, ref, atol=1e-5)


def test_cifar_module_gets_crop_and_flip_and_its_set_epoch_reseeds_the_loader(tmp_path):
    data = fake_cifar_module(tmp_path)
    loader = in_memory_loader(data, "train", device="cpu")
    assert (loader.crop_padding, loader.flip, len(loader)) == (4, True, 3)
    data.set_epoch(2)
    first = collect(loader)
    data.set_epoch(2)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, collect(loader)))
    assert in_memory_loader(fake_cifar_module(tmp_path, augment=False), "train", "cpu").crop_padding == 0


def test_mnist_module_is_not_augmented(tmp_path):
    data = MNISTData(root=str(tmp_path), download=False)
    data.train_set = data.test_set = SimpleNamespace(
        data=torch.zeros(3, 28, 28, dtype=torch.uint8), targets=torch.zeros(3, dtype=torch.long)
    )
    loader = in_memory_loader(data, "train", device="cpu")
    assert (loader.crop_padding, loader.flip) == (0, False)
    ((x, _),) = collect(loader)
    assert torch.allclose(x, torch.full_like(x, -0.1307 / 0.3081))


def test_digits_module_batches_are_its_tensors():
    data = DigitsData(batch_size=64)
    loader = in_memory_loader(data, "test", device="cpu")
    x = torch.cat([x for x, _ in loader])
    assert torch.equal(x, data.test_set.tensors[0])
    assert len(in_memory_loader(data, "train", device="cpu")) == len(data.train_loader())


def test_augmentation_params_accepts_only_what_it_can_run_on_the_device():
    assert augmentation_params([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]) == (4, True)
    assert augmentation_params([]) == (0, False)
    with pytest.raises(ConfigError, match="in_memory=false"):
        augmentation_params([T.ColorJitter(0.1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_live_on_the_cuda_device():
    loader = InMemoryLoader(uint8_images(), torch.arange(10), 4, crop_padding=2, flip=True, device="cuda")
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda


def test_the_engine_trains_on_the_in_memory_loader():
    from torch import nn

    from marginlab.heads.normface import NormFaceHead
    from marginlab.training.builders import MarginModel
    from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
    from marginlab.training.precision import Precision

    data = DigitsData(batch_size=64)
    loader = in_memory_loader(data, "train", device="cpu")
    torch.manual_seed(0)
    model = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), NormFaceHead(16, 10), nn.ModuleDict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = LoopState()
    for epoch in range(3):
        data.set_epoch(epoch)
        stats = train_one_epoch(
            StepParts(model, opt, sched),
            loader,
            Precision(torch.device("cpu"), "32"),
            state,
            LoopOptions(grad_clip=None, max_nonfinite=3, channels_last=False, log_every=10),
        )
    assert state.step == 3 * len(loader) and stats["nonfinite_steps"] == 0 and stats["acc"] > 0.8


def test_cli_in_memory_digits_run_equals_the_dataloader_run(run_train, metrics):
    """Same permutation per (seed, epoch), same batches: the two data paths train identically."""
    runs = []
    for flag in ("false", "true"):
        code, run_dir = run_train(
            f"dataset.in_memory={flag}",
            "logger=quiet",
            "trainer.epochs=2",
            "trainer.checkpoint=false",
            f"name=in_memory_{flag}",
        )
        assert code == 0
        runs.append(metrics[0](run_dir))
    assert runs[1]["train/loss"] == pytest.approx(runs[0]["train/loss"], rel=1e-5)
    assert runs[1]["test/acc"] == runs[0]["test/acc"]
