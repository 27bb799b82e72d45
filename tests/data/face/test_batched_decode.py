"""The fast face path (dataset.decode=cpu|cuda|auto): one batched JPEG decode per batch in the worker, uint8 until
the device, flip and normalisation there -- the same batches as the per-image PIL path, bit for bit."""

from __future__ import annotations

import pytest
import torch

from marginlab.data.face import normalize_face
from marginlab.data.face.batched import BatchedFaces
from marginlab.data.face.casia import CasiaData
from marginlab.data.face.on_device import DeviceFaceLoader, choose_decode, prefer_gpu
from marginlab.data.face.recordio import IRHeader, RecordIOWriter, pack, write_face_records
from marginlab.errors import ConfigError, DataError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def write_rec(tmp_path, face, labels, fmts=None):
    fmts = fmts or ["JPEG"] * len(labels)
    samples = [(face.encode(face.image(i + 1), fmt), lab) for i, (lab, fmt) in enumerate(zip(labels, fmts))]
    write_face_records(tmp_path, samples, style="insightface")


def epochs(data, loader, n=2):
    out = []
    for epoch in range(n):
        data.set_epoch(epoch)
        torch.manual_seed(epoch)  # without workers the flips come from the main process's generator
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b) and a
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and torch.equal(ya, yb)
        assert torch.equal(xa, xb), (xa - xb).abs().max()


def casia(tmp_path, decode, **kw):
    kw = {"batch_size": 4, "drop_last": False, "seed": 3, **kw}
    data = CasiaData(root=str(tmp_path), decode=decode, **kw)
    data.setup()
    return data


@pytest.mark.parametrize("workers", [0, 1])
def test_batched_decode_gives_the_per_image_batches(tmp_path, face, workers):
    """Same pixels (libjpeg-turbo both), same flips (same draws), same normalisation: equal batches over epochs,
    whether the worker is the main process or not."""
    write_rec(tmp_path, face, [0, 0, 1, 2, 2, 3, 3, 4, 1, 0], fmts=["JPEG"] * 9 + ["PNG"])  # PNG: the fallback
    old = casia(tmp_path, "pil", num_workers=workers)  # workers seed from the batch; the main process from its own
    new = casia(tmp_path, "cpu", num_workers=workers)
    new_loader = new.train_loader()
    assert isinstance(new_loader, DeviceFaceLoader) and new.decoder == "cpu"
    batch = next(iter(new_loader.loader))
    assert batch[0].dtype == torch.uint8 and batch[2].dtype == torch.bool  # what a worker ships
    ours, theirs = epochs(new, new_loader), epochs(old, old.train_loader())
    assert_same_batches(ours, theirs)
    unflipped = casia(tmp_path, "pil", flip=False)
    assert any(not torch.equal(x, z) for (x, _), (z, _) in zip(ours, epochs(unflipped, unflipped.train_loader())))


def test_decoded_batch_equals_the_per_image_decode(tmp_path, face):
    write_rec(tmp_path, face, [0, 1, 1, 2], fmts=["JPEG", "PNG", "JPEG", "JPEG"])
    for size in (112, [112, 96]):  # 96 wide: the centre crop, as a slice of the decoded tensor
        ds = casia(tmp_path, "cpu", image_size=size, flip=False).train_set
        items = BatchedFaces(ds).__getitems__([3, 0, 1, 2])
        for (x, label, flip), i in zip(items, [3, 0, 1, 2]):
            expected, expected_label = ds.load_uint8(i)
            assert x.dtype == torch.uint8 and torch.equal(x, expected) and label == expected_label and not flip


@pytest.mark.parametrize("variant", ["420", "444", "progressive", "gray", "cmyk"])
def test_torchvision_decodes_every_jpeg_kind_to_the_pixels_pil_gives(face, variant):
    """Both are libjpeg-turbo with the same settings: chroma subsampling, progressive, grayscale and CMYK files
    all come out as PIL's ``convert("RGB")`` pixels."""
    import io

    from PIL import Image

    from marginlab.data.face import decode_image, to_uint8_chw
    from marginlab.data.face.batched import byte_tensors, decode_jpegs

    img = Image.fromarray(face.image(5))
    img = img.convert({"gray": "L", "cmyk": "CMYK"}.get(variant, "RGB"))
    options = {"420": {"subsampling": 2}, "444": {"subsampling": 0}, "progressive": {"progressive": True}}
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **options.get(variant, {}))
    ours = decode_jpegs(byte_tensors([buf.getvalue()]))[0]
    assert torch.equal(ours, to_uint8_chw(decode_image(buf.getvalue(), variant)))


def test_device_normalisation_equals_the_per_image_normalisation(face):
    images = torch.stack([torch.from_numpy(face.image(i)).permute(2, 0, 1) for i in range(3)])
    flips = torch.tensor([True, False, True])
    faces = type("Faces", (), {"train": True})()
    x, y = DeviceFaceLoader([], faces, "cpu").finish((images.clone(), torch.arange(3), flips))
    expected = torch.stack([normalize_face(im.flip(-1) if f else im) for im, f in zip(images, flips)])
    assert torch.equal(x, expected)  # the same float32 operations in the same order: bit for bit
    assert x.dtype == torch.float32 and y.tolist() == [0, 1, 2]


def test_a_corrupt_jpeg_is_named_and_skipped_as_on_the_per_image_path(tmp_path, face):
    good = [face.encode(face.image(i + 1), "JPEG") for i in range(6)]
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, img in enumerate(good):
            w.write_idx(key, pack(IRHeader(0, float(key % 3), key, 0), img[:40] if key == 2 else img))
    with pytest.raises(DataError, match=r"record 2 \(offset \d+\): cannot decode the image"):
        list(casia(tmp_path, "cpu").train_loader())
    new, old = casia(tmp_path, "cpu", skip_corrupt=True), casia(tmp_path, "pil", skip_corrupt=True)
    assert_same_batches(epochs(new, new.train_loader()), epochs(old, old.train_loader()))


def test_the_gpu_decode_path_with_the_cpu_standing_in_gives_the_per_image_batches(tmp_path, face):
    """decode=cuda's pipeline (workers ship bytes, the device decodes) run with decode_jpeg on the CPU: everything
    but nvJPEG itself, so the batches are the per-image path's exactly (PNG through PIL on the way)."""
    write_rec(tmp_path, face, [0, 0, 1, 2, 2, 3, 3, 4, 1], fmts=["JPEG"] * 4 + ["PNG"] + ["JPEG"] * 4)
    old, new = casia(tmp_path, "pil"), casia(tmp_path, "cpu")
    new.decoder = "cuda"  # what choose_decode would resolve on a GPU; new.device stays the CPU
    loader = new.train_loader()
    assert loader.encoded and next(iter(loader.loader))[0].dim() == 1  # one buffer of encoded bytes per batch
    assert_same_batches(epochs(new, loader), epochs(old, old.train_loader()))


def test_the_gpu_decode_path_names_a_corrupt_jpeg_or_replaces_it(tmp_path, face):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in range(4):
            img = face.encode(face.image(key + 1), "JPEG")
            w.write_idx(key, pack(IRHeader(0, float(key), key, 0), img[:40] if key == 2 else img))
    data = casia(tmp_path, "cpu", flip=False)
    data.decoder = "cuda"
    with pytest.raises(DataError, match=r"record 2 \(offset \d+\): cannot decode the image on the GPU"):
        list(data.train_loader())
    data = casia(tmp_path, "cpu", flip=False, skip_corrupt=True)
    data.decoder = "cuda"
    ((x, y),) = list(data.train_loader())
    assert x.shape == (4, 3, 112, 112) and set(y.tolist()) == {0, 1, 3}  # record 2 -> another image of the batch
    assert data.train_set.skipped == 1


def test_decode_option_is_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.decode='gpu' is not allowed: choose one of auto, cpu, cuda, pil"):
        CasiaData(root=str(tmp_path), decode="gpu")
    assert choose_decode("auto", torch.device("cpu"), None, 4, 256) == "cpu"  # no CUDA device: no trial
    assert choose_decode("pil", torch.device("cpu"), None, 4, 256) == "pil"
    assert prefer_gpu(cpu_s=0.2, gpu_s=0.01, workers=4) and not prefer_gpu(cpu_s=0.2, gpu_s=0.06, workers=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_decode_is_refused_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset.decode='cuda' needs a CUDA GPU, and CUDA is not available here"):
        CasiaData(root=str(tmp_path), decode="cuda")


@cuda
def test_gpu_decode_matches_the_cpu_decode(tmp_path, face):
    write_rec(tmp_path, face, [0, 0, 1, 2, 2, 3, 3, 4], fmts=["JPEG"] * 7 + ["PNG"])
    gpu, cpu = casia(tmp_path, "cuda"), casia(tmp_path, "cpu")
    gpu_loader = gpu.loaders(torch.device("cuda")).train
    cpu_loader = cpu.loaders(torch.device("cuda")).train
    for (xg, yg), (xc, yc) in zip(epochs(gpu, gpu_loader), epochs(cpu, cpu_loader)):
        assert xg.is_cuda and torch.equal(yg, yc)
        assert (xg - xc).abs().max() <= 8 * 2 / 255  # nvJPEG vs libjpeg-turbo: a few levels at most
    assert choose_decode("auto", torch.device("cuda"), gpu.train_set, 2, 4) in ("cpu", "cuda")
