"""MXNet RecordIO (``.rec`` + ``.idx``) read and written without MXNet.

The on-disk format (dmlc-core ``include/dmlc/recordio.h`` + ``src/recordio.cc``; MXNet
``python/mxnet/recordio.py``):

* a record is ``magic lrec data pad``: ``magic`` = uint32 0xced7230a (little-endian), ``lrec`` = uint32
  ``(cflag << 29) | length``, then ``length`` bytes, then zero padding to a multiple of 4;
* a payload containing the magic word at a 4-byte-aligned position is split there into parts with
  cflag 1 (first), 2 (middle), 3 (last) -- the magic word itself is dropped and restored on reading;
  cflag 0 is a whole record;
* ``.idx`` holds one ``key\\toffset\\n`` line per record (``MXIndexedRecordIO.write_idx``), ``offset``
  being where the record's first part starts;
* an image record's payload is ``IRHeader`` packed as ``'IfQQ'`` (flag, label, id, id2; 24 bytes), then,
  when ``flag > 0``, ``flag`` float32 labels (``header.label`` is then that array), then the encoded image
  (``mxnet.recordio.pack``/``unpack``).

InsightFace's face releases (faces_webface_112x112, faces_emore, glint360k) add a header record at key 0
with an empty payload whose labels are ``(first identity record, end)``: images are keys
``1 .. label[0] - 1`` (arcface_torch ``dataset.py`` ``MXFaceDataset``; ``src/data/face2rec2.py`` writes
it); files from plain ``im2rec`` have no such record and every key in the ``.idx`` is an image.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginlab.data.face import FaceImageDataset, class_count
from marginlab.errors import DataError

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A  # dmlc::RecordIOWriter::kMagic
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29  # lrec = (cflag << 29) | length
LENGTH_MASK = (1 << LENGTH_BITS) - 1
IR_FORMAT = "<IfQQ"  # mxnet.recordio._IR_FORMAT ('IfQQ', native = little-endian, no padding)
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_SCAN_WIDTH = 8 + IR_SIZE + 4  # magic, lrec, IRHeader, first extra label
_SCAN_CHUNK = 1 << 16

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = (
    "An image record's header (mxnet.recordio.IRHeader): label is a float, or a float32 array when flag > 0."
)


# ---- payload: IRHeader + labels + bytes ------------------------------------------------------------------
def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """``mxnet.recordio.pack``: a number label gives flag 0; a sequence gives flag = its size, label 0."""
    header = IRHeader(*header)
    if isinstance(header.label, (int, float, np.integer, np.floating)):
        header = header._replace(flag=0)
        extra = b""
    else:
        labels = np.asarray(header.label, dtype="<f4").ravel()
        header = header._replace(flag=labels.size, label=0.0)
        extra = labels.tobytes()
    head = struct.pack(IR_FORMAT, int(header.flag), float(header.label), int(header.id), int(header.id2))
    return head + extra + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """``mxnet.recordio.unpack``: header (label an array when flag > 0) and the remaining bytes."""
    if len(record) < IR_SIZE:
        raise ValueError(f"{len(record)} bytes is shorter than the {IR_SIZE}-byte image-record header")
    header = IRHeader(*struct.unpack(IR_FORMAT, record[:IR_SIZE]))
    rest = record[IR_SIZE:]
    if header.flag > 0:
        if len(rest) < 4 * header.flag:
            raise ValueError(f"header announces {header.flag} float labels but only {len(rest)} bytes follow")
        header = header._replace(label=np.frombuffer(rest, dtype="<f4", count=header.flag).copy())
        rest = rest[4 * header.flag :]
    return header, rest


def first_label(header: IRHeader) -> float:
    """The class label: ``label`` when a number, its first element when an array (MXFaceDataset)."""
    return float(header.label) if header.flag == 0 else float(header.label[0])


# ---- framing: magic + lrec + data + pad ------------------------------------------------------------------
def encode_record(data: bytes) -> bytes:
    """The bytes ``dmlc::RecordIOWriter::WriteRecord`` writes for one record (including magic splitting)."""
    data = bytes(data)
    if len(data) > LENGTH_MASK:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {len(data)}")
    out = bytearray()
    start = 0
    i = data.find(MAGIC_BYTES)
    while i != -1:  # dmlc scans the 4-byte-aligned words; only those occurrences split the record
        if i % 4 == 0:
            out += MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << LENGTH_BITS) | (i - start))
            out += data[start:i]
            start = i + 4
        i = data.find(MAGIC_BYTES, i + 1)
    out += MAGIC_BYTES + struct.pack("<I", ((3 if start else 0) << LENGTH_BITS) | (len(data) - start))
    out += data[start:]
    out += b"\0" * (-len(data) % 4)  # parts before the last are 4-aligned, so this pads the whole record
    return bytes(out)


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx`` exactly as ``MXIndexedRecordIO(idx, rec, 'w').write_idx`` does.

    >>> with RecordIOWriter("train.rec", "train.idx") as w:
    ...     w.write_idx(1, pack(IRHeader(0, 3.0, 1, 0), jpeg_bytes))
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", newline="\n")

    def tell(self) -> int:
        return self._rec.tell()

    def write(self, record: bytes) -> int:
        """Appends one record (no index line); returns its offset."""
        pos = self._rec.tell()
        self._rec.write(encode_record(record))
        return pos

    def write_idx(self, key: int, record: bytes) -> int:
        pos = self.write(record)
        self._idx.write(f"{int(key)}\t{pos}\n")
        return pos

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_face_records(
    directory: str | os.PathLike, samples, style: str = "insightface", prefix: str = "train"
) -> tuple[Path, Path]:
    """Writes ``<directory>/<prefix>.rec`` and ``.idx`` from ``samples``: an iterable of (encoded image, label).

    ``style="insightface"`` mirrors InsightFace's ``face2rec2.py``: images at keys 1..N with labels
    ``[label, 1.0]`` (flag 2), samples of one identity contiguous (sorted by label here); then the header
    at key 0 with labels ``(N + 1, N + 1 + identities)`` and one record per identity with its key range,
    all with empty payloads. ``style="im2rec"`` mirrors MXNet's ``im2rec``: keys 0..N-1 in the given
    order, float label (flag 0), no header record. Returns (rec path, idx path).
    """
    if style not in ("insightface", "im2rec"):
        raise ValueError(f"style={style!r}: choose 'insightface' or 'im2rec'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = directory / f"{prefix}.rec", directory / f"{prefix}.idx"
    items = [(bytes(img), int(label)) for img, label in samples]
    with RecordIOWriter(rec_path, idx_path) as writer:
        if style == "im2rec":
            for key, (img, label) in enumerate(items):
                writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), img))
            return rec_path, idx_path
        items.sort(key=lambda item: item[1])
        ranges: list[tuple[int, int]] = []
        for key, (img, label) in enumerate(items, start=1):
            writer.write_idx(key, pack(IRHeader(0, [float(label), 1.0], key, 0), img))
            if not ranges or items[key - 2][1] != label:
                ranges.append((key, key + 1))
            else:
                ranges[-1] = (ranges[-1][0], key + 1)
        first = len(items) + 1
        writer.write_idx(0, pack(IRHeader(0, [float(first), float(first + len(ranges))], 0, 0), b""))
        for i, (lo, hi) in enumerate(ranges):
            writer.write_idx(first + i, pack(IRHeader(0, [float(lo), float(hi)], first + i, 0), b""))
    return rec_path, idx_path


# ---- reading ---------------------------------------------------------------------------------------------
def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parses ``key\\toffset`` lines into (keys int64, offsets int64), in file order.

    Vectorised (a few seconds for MS1M's 5.8M lines); a bad line gives a DataError naming its number.
    """
    idx_path = Path(idx_path)
    try:
        data = idx_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{idx_path}: cannot read the index ({exc})") from None
    buf = np.frombuffer(data, np.uint8)
    space = buf <= 32  # whitespace and control bytes separate tokens
    starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
    newlines = np.flatnonzero(buf == 10)
    per_line = np.bincount(np.searchsorted(newlines, starts), minlength=len(newlines) + 1)
    last = int(np.flatnonzero(per_line)[-1]) + 1 if starts.size else 0  # trailing blank lines are fine
    per_line = per_line[:last]
    if (per_line != 2).any():
        n = int(np.argmax(per_line != 2))
        lines = data.split(b"\n")
        raise DataError(f"{idx_path}, line {n + 1}: expected 'key<TAB>offset' (two integers), got {lines[n][:80]!r}")
    if last == 0:
        raise DataError(f"{idx_path}: the index is empty (no records)")
    try:
        pairs = np.array(data.split(), dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        for n, line in enumerate(data.split(b"\n"), start=1):
            try:
                [int(field) for field in line.split()]
            except (ValueError, OverflowError):
                raise DataError(
                    f"{idx_path}, line {n}: expected 'key<TAB>offset' (two integers), got {line[:80]!r}"
                ) from None
        raise
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    if (offsets < 0).any():
        n = int(np.argmax(offsets < 0))
        raise DataError(f"{idx_path}, line {n + 1}: negative offset {offsets[n]} for key {keys[n]}")
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"{idx_path}: key {uniq[np.argmax(counts > 1)]} appears {counts.max()} times; every key must be unique"
        )
    return keys, offsets


@dataclass
class ScanResult:
    """What ``RecordFile.scan`` learns about the records at ``offsets`` from their first 36 bytes."""

    length: np.ndarray  # length of the first part (the whole payload when cflag == 0)
    cflag: np.ndarray
    flag: np.ndarray
    label: np.ndarray  # first label, float64
    problem: list  # (position, message) for every record that is not a valid image record


class RecordFile:
    """Random access to a ``.rec`` by offset; safe to pickle into DataLoader workers (reopens lazily)."""

    def __init__(self, rec_path: str | os.PathLike):
        self.path = Path(rec_path)
        try:
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open the record file ({exc})") from None
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _read(self, offset: int, n: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._fd, n, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
        return os.read(self._fd, n)  # pragma: no cover

    def _fail(self, key, offset: int, problem: str) -> DataError:
        return DataError(f"{self.path}: record {key} (offset {offset}): {problem}")

    def read_record(self, offset: int, key=None, length: int | None = None) -> bytes:
        """The payload of the record starting at ``offset`` (parts joined, padding dropped).

        ``length`` (the first part's length, from ``scan``) lets a whole (cflag 0) record come in one read.
        """
        if length is not None:
            buf = self._read(offset, 8 + length)
            if len(buf) == 8 + length and buf[:4] == MAGIC_BYTES:
                lrec = struct.unpack_from("<I", buf, 4)[0]
                if lrec >> LENGTH_BITS == 0 and lrec & LENGTH_MASK == length:
                    return buf[8:]
        out = bytearray()
        pos, part = offset, 0
        while True:
            head = self._read(pos, 8)
            if len(head) < 8:
                if part == 0 and pos >= self.size:
                    raise self._fail(
                        key,
                        offset,
                        f"the offset is beyond the end of the file ({self.size} bytes): "
                        f"the .idx does not match this .rec, or the .rec is truncated",
                    )
                raise self._fail(
                    key,
                    offset,
                    f"truncated .rec: the file ends inside the record header "
                    f"(at byte {pos}, file is {self.size} bytes)",
                )
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise self._fail(
                    key,
                    offset,
                    f"bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x}): "
                    f"the .idx does not match this .rec, or the file is corrupt",
                )
            cflag, n = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            if cflag not in ((0, 1) if part == 0 else (2, 3)):
                raise self._fail(
                    key,
                    offset,
                    f"record part {part} at byte {pos} has continuation flag {cflag}: "
                    f"the offset does not point at the start of a record",
                )
            padded = n + (-n % 4)
            data = self._read(pos + 8, padded)
            if len(data) < padded:
                raise self._fail(
                    key,
                    offset,
                    f"truncated .rec: the record needs {padded} bytes at byte {pos + 8} "
                    f"but the file ends at {self.size}",
                )
            out += data[:n]
            pos += 8 + padded
            if cflag in (0, 3):
                return bytes(out)
            out += MAGIC_BYTES
            part += 1

    def scan(self, offsets: np.ndarray, keys: np.ndarray) -> ScanResult:
        """Checks every record's framing and reads its first label, vectorised over a memory map.

        Reads 36 bytes per record (one page each): magic, lrec, IRHeader and the first extra label. A
        record split by the magic word within those bytes (vanishingly rare) is read in full instead.
        """
        n = len(offsets)
        length = np.zeros(n, np.int64)
        cflag = np.zeros(n, np.int64)
        flag = np.zeros(n, np.int64)
        label = np.zeros(n, np.float64)
        problems: list[tuple[int, str]] = []
        mm = np.memmap(self.path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)
        span = np.arange(_SCAN_WIDTH, dtype=np.int64)
        for lo in range(0, n, _SCAN_CHUNK):
            off = offsets[lo : lo + _SCAN_CHUNK]
            pos = off[:, None] + span
            inside = pos < self.size
            raw = mm[np.minimum(pos, max(self.size - 1, 0))] if self.size else np.zeros(pos.shape, np.uint8)
            raw = np.where(inside, raw, 0).astype(np.uint8)
            words = raw.view("<u4")  # (m, 9): magic, lrec, flag, label, id(2), id2(2), extra label
            floats = raw.view("<f4")
            magic, lrec = words[:, 0], words[:, 1].astype(np.int64)
            ln, cf = lrec & LENGTH_MASK, lrec >> LENGTH_BITS
            fl = words[:, 2].astype(np.int64)
            lab = np.where(fl > 0, floats[:, 8], floats[:, 3]).astype(np.float64)
            sl = slice(lo, lo + len(off))
            length[sl], cflag[sl], flag[sl], label[sl] = ln, cf, fl, lab
            bad = (
                (off + 8 > self.size)
                | (magic != MAGIC)
                | (cf > 1)
                | ((cf == 0) & (off + 8 + ln > self.size))
                | ((cf == 0) & ((ln < IR_SIZE) | ((fl > 0) & (ln < IR_SIZE + 4 * fl))))
                | ((cf == 1) & (ln < IR_SIZE + 4))
            )
            for j in np.nonzero(bad)[0]:
                i = lo + int(j)
                try:  # the general reader names the problem (or handles an early split)
                    header, _ = self._unpack(self.read_record(int(offsets[i]), keys[i]), keys[i], int(offsets[i]))
                    length[i], cflag[i], flag[i], label[i] = -1, 1, header.flag, first_label(header)
                except DataError as exc:
                    problems.append((i, str(exc)))
        return ScanResult(length, cflag, flag, label, problems)

    def _unpack(self, record: bytes, key, offset: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack(record)
        except ValueError as exc:
            raise self._fail(key, offset, f"not an image record: {exc}") from None


class RecordFaceDataset(FaceImageDataset):
    """Images of a ``.rec`` at the given offsets, labels from the index scan."""

    def __init__(
        self,
        rec: RecordFile,
        keys: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        labels: np.ndarray,
        image_size: tuple[int, int],
        train: bool,
        skip_corrupt: bool = False,
    ):
        super().__init__(image_size, train, skip_corrupt)
        self.rec, self.keys, self.offsets, self.lengths, self.labels = rec, keys, offsets, lengths, labels

    def __len__(self) -> int:
        return len(self.offsets)

    def describe(self, index: int) -> str:
        return f"{self.rec.path}: record {int(self.keys[index])} (offset {int(self.offsets[index])})"

    def raw(self, index: int) -> tuple[bytes, int]:
        key, offset, length = int(self.keys[index]), int(self.offsets[index]), int(self.lengths[index])
        record = self.rec.read_record(offset, key, length if length >= 0 else None)
        _, img = self.rec._unpack(record, key, offset)
        if not img:
            raise DataError(f"{self.describe(index)}: the record holds no image bytes")
        return img, int(self.labels[index])


@dataclass
class RecordIndex:
    """The image records of a ``.rec``/``.idx`` pair, checked: what ``open_face_records`` returns."""

    rec: RecordFile
    keys: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    num_classes: int
    style: str  # "insightface" (header record at key 0) or "im2rec"
    skipped: list  # messages of the records dropped under skip_corrupt

    def describe(self, i: int) -> str:
        """The file and record of image ``i``, for messages."""
        return f"{self.rec.path}: record {int(self.keys[i])} (offset {int(self.offsets[i])})"

    def dataset(
        self, positions: np.ndarray | None, image_size: tuple[int, int], train: bool, skip_corrupt: bool = False
    ) -> RecordFaceDataset:
        sel = slice(None) if positions is None else positions
        return RecordFaceDataset(
            self.rec,
            self.keys[sel],
            self.offsets[sel],
            self.lengths[sel],
            self.labels[sel],
            image_size,
            train,
            skip_corrupt,
        )


def _header_record(rec: RecordFile, keys: np.ndarray, offsets: np.ndarray) -> tuple[int, int] | None:
    """InsightFace's key-0 header (flag > 0, empty payload, labels (first, end)) or None."""
    where = np.nonzero(keys == 0)[0]
    if len(where) == 0:
        return None
    offset = int(offsets[where[0]])
    header, payload = rec._unpack(rec.read_record(offset, 0), 0, offset)
    if header.flag < 2 or len(payload) != 0:
        return None  # an ordinary image at key 0 (plain im2rec, single- or multi-label)
    first, end = float(header.label[0]), float(header.label[1])
    if not (first.is_integer() and end.is_integer() and 1 <= first <= end):
        raise rec._fail(
            0,
            offset,
            f"header record labels ({first:g}, {end:g}) are not an identity range "
            f"(first image-free key, end) with 1 <= first <= end",
        )
    return int(first), int(end)


def open_face_records(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike, skip_corrupt: bool = False, num_classes: int | None = None
) -> RecordIndex:
    """Reads the index, finds the image records, checks each record's framing and label.

    InsightFace layout (key 0 is a header): images are keys 1..first-1, ``num_classes = end - first``.
    im2rec layout: every key of the ``.idx``, in its order; ``num_classes = max label + 1``. Any record
    whose offset is past the end, whose magic is wrong, that is truncated, or whose label is not a
    non-negative integer raises DataError naming the file and the key -- or, with ``skip_corrupt``, is
    dropped, counted and logged. The class count is then checked against the labels (``class_count``):
    ``num_classes`` (``dataset.num_classes``), when given, replaces it.
    """
    rec = RecordFile(rec_path)
    keys, offsets = read_index(idx_path)
    header = _header_record(rec, keys, offsets)
    style = "im2rec"
    if header is not None:
        style = "insightface"
        first, end = header
        order = np.argsort(keys, kind="stable")
        wanted = np.arange(1, first, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1)
        missing = wanted[keys[order][at] != wanted]
        if missing.size:
            raise DataError(
                f"{idx_path}: the header record promises images at keys 1..{first - 1} but key "
                f"{missing[0]} is missing ({missing.size} missing in all)"
            )
        positions = order[at]
        keys, offsets = keys[positions], offsets[positions]
    scan = rec.scan(offsets, keys)
    bad = np.zeros(len(keys), bool)
    messages: list[str] = []
    for i, message in scan.problem:
        bad[i] = True
        messages.append(message)
    label = scan.label
    wrong = ~bad & ~(np.isfinite(label) & (label >= 0) & (label < 2**31) & (label == np.floor(label)))
    if header is not None:
        wrong |= ~bad & np.isfinite(label) & (label >= header[1] - header[0])
    for i in np.nonzero(wrong)[0]:
        bad[i] = True
        limit = f" below {header[1] - header[0]} (the header's identity count)" if header is not None else " below 2^31"
        messages.append(
            f"{rec.path}: record {int(keys[i])} (offset {int(offsets[i])}): label {float(label[i])!r} "
            f"is not a class index (an integer >= 0{limit})"
        )
    if messages and not skip_corrupt:
        more = f" (and {len(messages) - 1} more bad records; skip_corrupt=true drops them)" if len(messages) > 1 else ""
        raise DataError(messages[0] + more)
    if messages:
        log.warning(
            "skip_corrupt: dropped %d of %d records of %s; first: %s", len(messages), len(keys), rec.path, messages[0]
        )
        for message in messages[1:20]:
            log.warning("skip_corrupt: dropped %s", message)
    keep = ~bad
    if not keep.any():
        raise DataError(f"{rec.path}: no readable image records")
    labels = label[keep].astype(np.int64)
    index = RecordIndex(rec, keys[keep], offsets[keep], scan.length[keep], labels, 0, style, messages)
    if header is not None:
        counted, blame = (
            header[1] - header[0],
            (f"{rec.path}: record 0 (the header) gives the identity range {header[0]}..{header[1]}"),
        )
    else:
        top = int(np.argmax(labels))
        counted, blame = int(labels[top]) + 1, f"{index.describe(top)} has label {int(labels[top])}"
    index.num_classes = class_count(labels, counted, num_classes, index.describe, blame)
    return index
