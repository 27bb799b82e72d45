"""The device side of the fast face path: uint8 batches (or encoded bytes) become normalised float batches on
the training device, as the batch is fetched by the training loop -- not in the DataLoader workers.

``dataset.decode`` chooses who decodes:

* ``pil``  -- the per-image path: PIL decode, flip and ``(x / 255 - 0.5) / 0.5`` in the worker, float32 batches;
* ``cpu``  -- batched ``torchvision.io.decode_jpeg`` in the workers (``batched.py``), uint8 batches; flip and
  normalisation on the device. The same pixels and flips as ``pil`` (libjpeg-turbo in both), bit for bit;
* ``cuda`` -- the workers only read; nvJPEG decodes each batch on the GPU (``decode_jpeg(device="cuda")``).
  nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: pixels may differ by a few levels;
* ``auto`` -- ``cuda`` when training on CUDA and a timed trial on the data's own records says the GPU decodes
  a batch faster than the workers deliver one on the CPU (``choose_decode``; the choice is logged), else
  ``cpu``. A timed choice can differ between machines: set ``cpu`` or ``cuda`` for bit-identical reruns there.
"""

from __future__ import annotations

import logging
import re
import time

import torch
from torch import Tensor

from marginlab.data.face import FaceImageDataset, decode_image, fit_face, to_uint8_chw
from marginlab.data.face.batched import byte_tensors, decode_jpegs, fit_tensor, is_jpeg, payload_bytes
from marginlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DECODERS = ("auto", "cpu", "cuda", "pil")


def check_decode(value) -> str:
    """``dataset.decode``: one of DECODERS; ``cuda`` refused where CUDA is not available."""
    if value not in DECODERS:
        raise ConfigError(f"dataset.decode={value!r} is not allowed: choose one of {', '.join(DECODERS)}")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "dataset.decode='cuda' needs a CUDA GPU, and CUDA is not available here: use dataset.decode=auto or cpu"
        )
    return value


def prefer_gpu(cpu_s: float, gpu_s: float, workers: int) -> bool:
    """GPU decoding wins when it turns a batch around faster than ``workers`` CPU processes deliver one
    (each takes ``cpu_s`` per batch): then the workers, not the GPU, would set the pace."""
    return gpu_s < cpu_s / max(1, workers)


def choose_decode(requested: str, device: torch.device, faces: FaceImageDataset, workers: int, batch_size: int) -> str:
    """The decoder ``requested`` resolves to on ``device`` (see the module's docstring); ``auto`` on CUDA times
    one batch of the data's first records both ways, after a warm-up of each."""
    if requested != "auto":
        if requested == "cuda" and device.type != "cuda":
            raise ConfigError(
                f"dataset.decode='cuda' decodes on the training device, but training runs on "
                f"{device}: use dataset.decode=auto or cpu, or trainer.device=cuda"
            )
        return requested
    if device.type != "cuda":
        return "cpu"
    try:
        payloads = [payload_bytes(faces.raw(i)[0]) for i in range(min(len(faces), batch_size))]
    except (DataError, OSError):  # an unreadable first record: the CPU path names it (or skips it)
        return "cpu"
    payloads = [p for p in payloads if is_jpeg(p)]
    if not payloads:
        return "cpu"

    def seconds(where) -> float:
        decode_jpegs(byte_tensors(payloads), where)  # warm-up (nvJPEG handles, allocator)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        decode_jpegs(byte_tensors(payloads), where)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    try:
        cpu_s, gpu_s = seconds("cpu"), seconds(device)
    except RuntimeError as exc:  # a record the trial cannot decode: the CPU path will name it
        log.info("dataset.decode=auto: the GPU decode trial failed (%s); decoding on the CPU", exc)
        return "cpu"
    choice = "cuda" if prefer_gpu(cpu_s, gpu_s, workers) else "cpu"
    log.info(
        "dataset.decode=auto chose %s: %d images decode in %.1f ms on the GPU, %.1f ms on one CPU core (%d workers)",
        choice,
        len(payloads),
        gpu_s * 1e3,
        cpu_s * 1e3,
        workers,
    )
    return choice


def decode_on_device(batch, faces: FaceImageDataset, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``collate_encoded``'s batch -> (uint8 images on ``device``, labels, flips). JPEGs go to nvJPEG in one call;
    other formats through PIL on the CPU. An image nvJPEG cannot decode raises DataError naming its record, or
    with ``skip_corrupt`` is replaced by the next decodable image of the batch (label and flip with it)."""
    data, lengths, labels, flips, where = batch
    payloads = list(torch.split(data, lengths.tolist()))
    size = faces.image_size
    images: list[Tensor | None] = [None] * len(payloads)
    jpeg = [k for k, p in enumerate(payloads) if is_jpeg(p[:3].numpy().tobytes())]
    try:
        for k, x in zip(jpeg, decode_jpegs([payloads[k] for k in jpeg], device) if jpeg else []):
            images[k] = fit_tensor(x, size)
    except RuntimeError:  # one of them is bad: find which
        for k in jpeg:
            try:
                images[k] = fit_tensor(decode_jpegs([payloads[k]], device)[0], size)
            except RuntimeError as exc:
                reason = re.sub(
                    r"^.*\.cpp:\d+, ", "", str(exc).strip().splitlines()[0]
                )  # drop torchvision's source line
                problem = DataError(f"{faces.describe(int(where[k]))}: cannot decode the image on the GPU ({reason})")
                if not faces.skip_corrupt:
                    raise problem from None
                faces.note_skipped(problem)
    for k in range(len(images)):
        if k not in jpeg:  # PNG and friends: PIL on the CPU, as the per-image path
            try:
                img = decode_image(payloads[k].numpy().tobytes(), faces.describe(int(where[k])))
            except DataError as exc:
                if not faces.skip_corrupt:
                    raise
                faces.note_skipped(exc)
                continue
            images[k] = to_uint8_chw(fit_face(img, size)).to(device)
    good = [k for k, x in enumerate(images) if x is not None]
    if not good:
        raise DataError(
            f"{faces.describe(int(where[0]))}: no image of this batch can be decoded on the GPU; "
            f"the data set looks broken (dataset.decode=cpu names each bad record)"
        )
    take = [k if images[k] is not None else next((g for g in good if g > k), good[0]) for k in range(len(images))]
    index = torch.tensor(take)
    return torch.stack([images[k] for k in take]), labels[index], flips[index]


def flip_where(images: Tensor, flips: Tensor) -> Tensor:
    """Mirrors left-right the images (B, C, H, W) where ``flips`` (B, bool) is True. On a GPU as one
    ``torch.where`` (no host sync); on the CPU in place, only the chosen images (half the memory traffic)."""
    if images.device.type == "cpu":
        chosen = flips.nonzero().squeeze(1)
        return images.index_copy_(0, chosen, images.index_select(0, chosen).flip(-1))
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


def normalize_face_(x: Tensor) -> Tensor:
    """``normalize_face`` in place on a float32 batch: the same operations in the same order, so the same values
    as the per-image path bit for bit, without its three temporaries."""
    return x.div_(255.0).sub_(0.5).div_(0.5)  # (x / 255 - 0.5) / 0.5, InsightFace's normalisation


class DeviceFaceLoader:
    """Iterates a face DataLoader of uint8 (or encoded) batches and yields ``(images float32 on device in
    [-1, 1], labels int64 on device)`` like a DataLoader: decode (``encoded``), flip and ``normalize_face``
    run on ``device``, as batched tensor ops."""

    def __init__(self, loader, faces: FaceImageDataset, device: torch.device | str, encoded: bool = False):
        self.loader, self.faces, self.encoded = loader, faces, bool(encoded)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> FaceImageDataset:
        """The per-image view of the same samples (``dataset[i]``: float32 image, label), as a DataLoader's."""
        return self.faces

    def finish(self, batch) -> tuple[Tensor, Tensor]:
        if self.encoded:
            images, labels, flips = decode_on_device(batch, self.faces, self.device)
        else:
            images, labels, flips = batch
            images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.faces.train:
            images = flip_where(images, flips.to(self.device, non_blocking=True))
        return normalize_face_(images.to(torch.float32)), labels

    def __iter__(self):
        for batch in self.loader:
            yield self.finish(batch)
