"""The worker side of the fast face path: a batch of records read and JPEG-decoded in one call, kept uint8.

``BatchedFaces`` wraps a ``FaceImageDataset``. Its ``__getitems__`` (what a DataLoader calls with the whole
batch of indices) reads every record, decodes all JPEG payloads with one ``torchvision.io.decode_jpeg`` call on
a list (libjpeg-turbo, the same library and pixels as PIL's decoder), and returns uint8 (3, H, W) images with
their labels and the flip decision of each sample: flipping and the float normalisation happen on the
training device (``on_device.py``), so a worker ships 1 byte per pixel instead of 4 and does no float work.
With ``encoded=True`` the worker only reads: it ships the encoded bytes and the GPU decodes them.

The random flips are drawn exactly as ``FaceImageDataset.load`` draws them (one ``torch.rand(())`` per sample,
in batch order, after the sample was read), so with the same worker seed the batches equal the per-image
path's. Anything unusual -- a non-JPEG payload (PNG), an image that needs a resize, a record or image that
cannot be read -- goes through the per-image code, so errors and ``skip_corrupt`` behave as there.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from marginlab.data.face import FaceImageDataset, fit_face, to_uint8_chw
from marginlab.errors import DataError

JPEG_SOI = b"\xff\xd8\xff"  # JPEG start-of-image marker + the first segment's marker byte (ITU-T T.81 B.1.1.3)


def is_jpeg(payload) -> bool:
    return bytes(payload[:3]) == JPEG_SOI


def decode_jpegs(payloads: list[Tensor], device: torch.device | str = "cpu") -> list[Tensor]:
    """``torchvision.io.decode_jpeg`` on a list of 1-D uint8 CPU tensors -> uint8 (3, h, w) RGB tensors on
    ``device`` (``"cuda"``: nvJPEG, one batched call). Raises RuntimeError when any payload cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated (torchcodec replaces them)
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def fit_tensor(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``fit_face`` for a decoded uint8 (3, h, w) tensor: untouched at the size, the centre crop of a wider
    image of the same height as a slice; a resize goes through PIL on the CPU, as the per-image path does."""
    h, w = size
    if x.shape[1] == h and x.shape[2] == w:
        return x
    if x.shape[1] == h and x.shape[2] > w:
        left = (x.shape[2] - w) // 2
        return x[:, :, left : left + w].contiguous()
    img = Image.fromarray(x.permute(1, 2, 0).cpu().numpy())
    return to_uint8_chw(fit_face(img, size)).to(x.device)


def payload_bytes(data) -> bytes:
    """A record's bytes as they are, or the file a path names (ImageFolder); OSError when it cannot be read."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    with open(os.fspath(data), "rb") as f:
        return f.read()


def byte_tensors(payloads: list[bytes]) -> list[Tensor]:
    """1-D uint8 tensors viewing one writable buffer (one copy; no warning about read-only memory)."""
    joined = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
    return list(torch.split(joined, [len(p) for p in payloads]))


class BatchedFaces(Dataset):
    """``faces`` read a batch at a time: items ``(uint8 image, label, flip)``, or with ``encoded`` the
    still-encoded ``(bytes, label, flip, index)`` for a decode on the GPU (``collate_encoded`` batches them)."""

    def __init__(self, faces: FaceImageDataset, encoded: bool = False):
        self.faces = faces
        self.encoded = bool(encoded)
        import torchvision.io  # noqa: F401  (once, here: forked workers inherit it instead of importing it each)

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def flip(self) -> bool:
        """The per-sample draw of ``FaceImageDataset.load``: the same generator, the same order."""
        return bool(self.faces.train and torch.rand(()) < 0.5)

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        if self.encoded:
            return [(*self._read(i), self.flip(), i) for i in indices]
        try:
            images, labels = self._decode_together(indices)
        except (DataError, OSError, RuntimeError):  # something is wrong with one of them: find it one by one
            return [(*self.faces.first_readable(i, self.faces.load_uint8), self.flip()) for i in indices]
        return [(x, label, self.flip()) for x, label in zip(images, labels)]

    def _read(self, index: int) -> tuple[bytes, int]:
        def read(j: int) -> tuple[bytes, int]:
            data, label = self.faces.raw(j)
            try:
                return payload_bytes(data), label
            except OSError as exc:
                raise DataError(f"{self.faces.describe(j)}: cannot read the image ({exc})") from None

        return self.faces.first_readable(index, read)

    def _decode_together(self, indices: list[int]) -> tuple[list[Tensor], list[int]]:
        size = self.faces.image_size
        raws = [self.faces.raw(i) for i in indices]
        payloads = [payload_bytes(data) for data, _ in raws]
        jpeg = [k for k, p in enumerate(payloads) if is_jpeg(p)]
        images: list[Tensor | None] = [None] * len(indices)
        if jpeg:
            decoded = decode_jpegs(byte_tensors([payloads[k] for k in jpeg]))
            for k, x in zip(jpeg, decoded):
                images[k] = fit_tensor(x, size)
        for k, x in enumerate(images):
            if x is None:  # PNG and friends: the per-image decoder
                images[k], _ = self.faces.load_uint8(indices[k])
        return images, [label for _, label in raws]


def collate_encoded(samples: list[tuple]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(all payloads as one uint8 buffer, their lengths, labels, flips, dataset indices): five tensors, so a
    worker hands over a batch in five shared-memory blocks rather than one per image."""
    payloads, labels, flips, where = zip(*samples)
    data = torch.from_numpy(np.frombuffer(b"".join(payloads), dtype=np.uint8).copy())
    return (
        data,
        torch.tensor([len(p) for p in payloads], dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(flips, dtype=torch.bool),
        torch.tensor(where, dtype=torch.int64),
    )


def collate_decoded(samples: list[tuple]) -> tuple[Tensor, Tensor, Tensor]:
    """(uint8 images B x 3 x H x W, labels int64, flips bool)."""
    return tuple(default_collate(samples))
