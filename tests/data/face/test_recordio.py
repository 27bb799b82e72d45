"""MXNet RecordIO without MXNet: the exact bytes written, InsightFace- and im2rec-style files read back
through CasiaData, and every kind of bad input reported with the file, the record and the problem."""

from __future__ import annotations

import logging
import pickle
import struct

import numpy as np
import pytest
import torch

from marginlab.data.face.casia import CasiaData
from marginlab.data.face.recordio import (
    MAGIC,
    IRHeader,
    RecordIOWriter,
    encode_record,
    open_face_records,
    pack,
    read_index,
    unpack,
    write_face_records,
)
from marginlab.errors import DataError

M = struct.pack("<I", 0xCED7230A)


def lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


# ---- the format, byte for byte ---------------------------------------------------------------------------
def test_framing_matches_dmlc_writer():
    # whole record: magic, lrec(0, 5), data, 3 zero bytes of padding to a multiple of 4
    assert encode_record(b"abcde") == M + lrec(0, 5) + b"abcde\0\0\0"
    assert encode_record(b"abcd") == M + lrec(0, 4) + b"abcd"
    assert encode_record(b"") == M + lrec(0, 0)
    # the magic word at aligned offsets splits the record (cflag 1 first, 2 middle, 3 last); the word is dropped
    data = b"AAAA" + M + b"BBBBBBBB" + M + b"CC"
    assert encode_record(data) == (M + lrec(1, 4) + b"AAAA" + M + lrec(2, 8) + b"BBBBBBBB" + M + lrec(3, 2) + b"CC\0\0")
    assert encode_record(M) == M + lrec(1, 0) + M + lrec(3, 0)
    # an unaligned occurrence is not special
    assert encode_record(b"A" + M + b"BBB") == M + lrec(0, 8) + b"A" + M + b"BBB"


def dmlc_write_record(data: bytes) -> bytes:
    """dmlc-core src/recordio.cc RecordIOWriter::WriteRecord, transcribed line by line."""
    out, dptr, n = bytearray(), 0, len(data)
    lower_align, upper_align = (n >> 2) << 2, ((n + 3) >> 2) << 2
    for i in range(0, lower_align, 4):
        if data[i : i + 4] == M:
            out += M + lrec(1 if dptr == 0 else 2, i - dptr) + data[dptr:i]
            dptr = i + 4
    out += M + lrec(3 if dptr != 0 else 0, n - dptr) + data[dptr:]
    return bytes(out + b"\0" * (upper_align - n))


def test_framing_random_payloads_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pieces = [M, M[:2], M[2:], b"", b"x", b"yz", b"abc", b"\x0a\x23"]
    payloads = [b"".join(pieces[j] for j in rng.integers(0, len(pieces), rng.integers(0, 12))) for _ in range(400)]
    with RecordIOWriter(tmp_path / "r.rec", tmp_path / "r.idx") as w:
        for key, payload in enumerate(payloads):
            assert encode_record(payload) == dmlc_write_record(payload)
            w.write_idx(key, payload)
    from marginlab.data.face.recordio import RecordFile

    f = RecordFile(tmp_path / "r.rec")
    keys, offsets = read_index(tmp_path / "r.idx")
    assert [f.read_record(int(o), int(k)) for k, o in zip(keys, offsets)] == payloads


def test_pack_unpack_like_mxnet():
    s = pack(IRHeader(0, 7.0, 42, 0), b"img")
    assert s == struct.pack("<IfQQ", 0, 7.0, 42, 0) + b"img"
    header, payload = unpack(s)
    assert header == IRHeader(0, 7.0, 42, 0) and payload == b"img"
    s = pack(IRHeader(0, [3.0, 1.0], 5, 0), b"xy")  # an array label: flag = its size, label field 0
    assert s == struct.pack("<IfQQ", 2, 0.0, 5, 0) + np.array([3, 1], "<f4").tobytes() + b"xy"
    header, payload = unpack(s)
    assert header.flag == 2 and header.label.tolist() == [3.0, 1.0] and payload == b"xy"


def test_writer_index_lines_and_offsets(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        assert w.write_idx(7, b"abcde") == 0
        assert w.write_idx(3, b"xyz") == 16  # 8 + 5 + 3 padding
    assert (tmp_path / "a.idx").read_bytes() == b"7\t0\n3\t16\n"
    keys, offsets = read_index(tmp_path / "a.idx")
    assert keys.tolist() == [7, 3] and offsets.tolist() == [0, 16]


# ---- reading through CasiaData ---------------------------------------------------------------------------
def make_samples(face, labels, fmt="PNG"):
    images = [face.image(i + 1) for i in range(len(labels))]
    return images, [(face.encode(img, fmt), lab) for img, lab in zip(images, labels)]


def load_all(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_insightface_style_rec(tmp_path, face):
    labels = [0, 0, 1, 2, 2, 2]
    images, samples = make_samples(face, labels)
    write_face_records(tmp_path, samples, style="insightface")
    data = CasiaData(root=str(tmp_path), flip=False, batch_size=4)
    data.setup()
    assert data.source == "rec:insightface"
    assert data.num_classes == 3  # the header's identity range, not the config
    assert len(data.train_set) == 6 and data.val_set is None and data.val_loader() is None
    x, y = load_all(data.train_set)
    assert x.shape == (6, 3, 112, 112) and x.dtype == torch.float32
    assert y.tolist() == labels
    np.testing.assert_allclose(x.numpy(), np.stack([face.normalized(im) for im in images]), atol=1e-6)
    xb, yb = next(iter(data.train_loader()))
    assert xb.shape == (4, 3, 112, 112) and yb.dtype == torch.int64


def test_header_record_layout(tmp_path, face):
    """face2rec2.py's layout: images 1..N, then key 0 = (N+1, N+1+ids), then one record per identity."""
    _, samples = make_samples(face, [1, 0, 1])
    rec, idx = write_face_records(tmp_path, samples, style="insightface")
    keys, _ = read_index(idx)
    assert keys.tolist() == [1, 2, 3, 0, 4, 5]
    from marginlab.data.face.recordio import RecordFile

    f = RecordFile(rec)
    offsets = dict(zip(*read_index(idx)))
    header, payload = unpack(f.read_record(int(offsets[0]), 0))
    assert header.flag == 2 and header.label.tolist() == [4.0, 6.0] and payload == b""
    header, payload = unpack(f.read_record(int(offsets[5]), 5))
    assert header.label.tolist() == [2.0, 4.0]  # identity 1 holds keys 2..3 (sorted by label)


def test_im2rec_style_rec_uses_every_key_in_idx_order(tmp_path, face):
    images, samples = make_samples(face, [4, 0, 2], fmt="JPEG")
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(rec, idx) as w:  # keys out of order, as im2rec writes a shuffled .lst
        for key, (img, label) in zip([10, 0, 7], samples):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), img))
    data = CasiaData(root=str(tmp_path), flip=False)
    data.setup()
    assert data.source == "rec:im2rec" and data.num_classes == 5  # max label + 1
    x, y = load_all(data.train_set)
    assert y.tolist() == [4, 0, 2]
    expected = np.stack([face.normalized(im) for im in images])
    assert np.abs(x.numpy() - expected).mean() < 0.1  # JPEG (chroma subsampled): close, not exact
    assert np.abs(x.numpy() - expected[[1, 2, 0]]).mean() > 0.3  # and not another image


def test_im2rec_multilabel_image_at_key0_is_not_a_header(tmp_path, face):
    _, samples = make_samples(face, [1, 0])
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, (img, label) in enumerate(samples):
            w.write_idx(key, pack(IRHeader(0, [float(label), 9.0], key, 0), img))  # flag 2, but an image
    index = open_face_records(tmp_path / "train.rec", tmp_path / "train.idx")
    assert index.style == "im2rec" and index.labels.tolist() == [1, 0] and index.num_classes == 2


def test_records_split_by_the_magic_word_are_read(tmp_path, face):
    """Magic in the header's id (offset 8), id2 (16) and an extra label (28): all split records."""
    images, samples = make_samples(face, [0, 1, 2])
    magic_float = np.frombuffer(M, "<f4")[0]
    headers = [
        IRHeader(0, 0.0, MAGIC, 0),
        IRHeader(0, 1.0, 1, MAGIC | (MAGIC << 32)),
        IRHeader(0, [2.0, 0.0, float(magic_float)], 2, 0),
    ]
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, (header, (img, _)) in enumerate(zip(headers, samples)):
            w.write_idx(key, pack(header, img))
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(M) > 3  # split records carry several parts
    data = CasiaData(root=str(tmp_path), flip=False)
    x, y = load_all(data.train_loader().dataset)
    assert y.tolist() == [0, 1, 2]
    np.testing.assert_allclose(x.numpy(), np.stack([face.normalized(im) for im in images]), atol=1e-6)


def test_dataset_pickles_for_workers(tmp_path, face):
    _, samples = make_samples(face, [0, 1])
    write_face_records(tmp_path, samples)
    data = CasiaData(root=str(tmp_path), flip=False)
    data.setup()
    ds = data.train_set
    ds[0]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1][0], ds[1][0])


def test_image_size_112x96_is_a_centre_crop(tmp_path, face):
    images, samples = make_samples(face, [0])
    write_face_records(tmp_path, samples)
    data = CasiaData(root=str(tmp_path), image_size=[112, 96], flip=False)
    data.setup()
    assert data.image_size == (112, 96) and data.image_shape == (112, 96)
    x, _ = data.train_set[0]
    np.testing.assert_allclose(x.numpy(), face.normalized(images[0][:, 8:104]), atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.fixture
def rec_dir(tmp_path, face):
    _, samples = make_samples(face, [0, 1, 1, 2])
    write_face_records(tmp_path, samples, style="im2rec")
    return tmp_path


def rewrite_idx(path, change):
    keys, offsets = read_index(path)
    offsets = change(offsets.copy())
    path.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets)))


def test_truncated_rec(rec_dir):
    rec = rec_dir / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train\.rec: record 3 \(offset \d+\): truncated"):
        CasiaData(root=str(rec_dir)).setup()


def test_idx_offset_beyond_end(rec_dir):
    size = (rec_dir / "train.rec").stat().st_size
    rewrite_idx(rec_dir / "train.idx", lambda o: np.where(np.arange(len(o)) == 2, size + 400, o))
    with pytest.raises(DataError, match=rf"train\.rec: record 2 \(offset {size + 400}\): the offset is beyond the end"):
        CasiaData(root=str(rec_dir)).setup()


def test_idx_offset_with_bad_magic(rec_dir):
    rewrite_idx(rec_dir / "train.idx", lambda o: np.where(np.arange(len(o)) == 1, o + 40, o))
    with pytest.raises(DataError, match=r"train\.rec: record 1 \(offset \d+\): bad magic .* does not match"):
        CasiaData(root=str(rec_dir)).setup()


def test_malformed_idx_line(rec_dir):
    idx = rec_dir / "train.idx"
    lines = idx.read_text().splitlines()
    lines[2] = lines[2] + "\t5"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.idx, line 3: expected 'key<TAB>offset'"):
        CasiaData(root=str(rec_dir)).setup()
    lines[2] = "2\tabc"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.idx, line 3: expected 'key<TAB>offset'.*abc"):
        CasiaData(root=str(rec_dir)).setup()


def test_missing_idx_and_empty_root(tmp_path, face):
    _, samples = make_samples(face, [0])
    write_face_records(tmp_path / "data", samples)
    (tmp_path / "data" / "train.idx").unlink()
    with pytest.raises(DataError, match=r"train\.idx is missing"):
        CasiaData(root=str(tmp_path / "data")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither train.rec"):
        CasiaData(root=str(tmp_path / "empty")).setup()
    with pytest.raises(DataError, match="does not exist"):
        CasiaData(root=str(tmp_path / "nowhere")).setup()


def test_bad_label(tmp_path, face):
    _, samples = make_samples(face, [0, 1])
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), samples[0][0]))
        w.write_idx(1, pack(IRHeader(0, 1.5, 1, 0), samples[1][0]))
    with pytest.raises(DataError, match=r"record 1 .*label 1\.5 is not a class index"):
        CasiaData(root=str(tmp_path)).setup()


def test_header_label_beyond_identity_count(tmp_path, face):
    _, samples = make_samples(face, [0, 5])
    rec, idx = write_face_records(tmp_path, samples)  # 2 identities in the header, but label 5
    with pytest.raises(DataError, match=r"record 2 .*label 5\.0 is not a class index .*below 2"):
        CasiaData(root=str(tmp_path)).setup()


def corrupt_image_record(rec_dir, face, key=1):
    """Rewrites the file with record ``key`` holding bytes that are not an image."""
    index = open_face_records(rec_dir / "train.rec", rec_dir / "train.idx")
    samples = []
    for k, off in zip(index.keys, index.offsets):
        header, payload = unpack(index.rec.read_record(int(off), int(k)))
        samples.append((b"not a jpeg at all" if k == key else payload, header.label))
    write_face_records(rec_dir, samples, style="im2rec")


def test_corrupt_image_raises_naming_the_record(rec_dir, face):
    corrupt_image_record(rec_dir, face, key=1)
    data = CasiaData(root=str(rec_dir))
    data.setup()  # framing is fine; the image is decoded when read
    data.train_set[0]
    with pytest.raises(DataError, match=r"train\.rec: record 1 \(offset \d+\): cannot decode the image"):
        data.train_set[1]


def test_skip_corrupt_counts_and_logs(rec_dir, face, caplog):
    corrupt_image_record(rec_dir, face, key=1)
    rewrite_idx(rec_dir / "train.idx", lambda o: np.where(np.arange(len(o)) == 3, o + 4, o))  # bad magic
    with caplog.at_level(logging.WARNING, logger="marginlab.data.face"):
        data = CasiaData(root=str(rec_dir), skip_corrupt=True, flip=False)
        data.setup()
        assert len(data.skipped_records) == 1 and "record 3" in data.skipped_records[0]
        assert len(data.train_set) == 3 and data.num_classes == 2  # labels 0, 1, 1 remain
        x1, y1 = data.train_set[1]  # record 1 is unreadable: replaced by the next one (record 2)
        x2, y2 = data.train_set[2]
        assert torch.equal(x1, x2) and y1 == y2
        assert data.train_set.skipped == 1
    text = caplog.text
    assert "dropped 1 of 4 records" in text and "record 3" in text
    assert "skipped" in text and "record 1" in text and "cannot decode" in text


def test_val_fraction_holds_out_a_slice(tmp_path, face):
    _, samples = make_samples(face, [i % 3 for i in range(10)])
    write_face_records(tmp_path, samples)
    data = CasiaData(root=str(tmp_path), val_fraction=0.2, split_seed=1)
    data.setup()
    assert len(data.train_set) == 8 and len(data.val_set) == 2
    assert not data.val_set.train  # no flips on the held-out slice
    held = set(data.val_set.keys.tolist())
    assert held.isdisjoint(data.train_set.keys.tolist()) and len(held) == 2
    assert next(iter(data.val_loader()))[0].shape[0] == 2
