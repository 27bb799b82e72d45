"""CASIA-WebFace (Yi et al. 2014; 10,572 identities, ~490k images) as aligned crops -- or any face set
stored the same way (MS1M/faces_emore, Glint360K: same reader, point ``root`` at their folder).

``root`` holds either InsightFace's RecordIO pair ``train.rec`` + ``train.idx`` (the
``faces_webface_112x112`` release) or an ImageFolder tree ``<root>/<identity>/<image>.jpg``. The class
count comes from the data: the header record's identity range, ``max label + 1`` for plain im2rec files,
or the number of identity folders -- refused when far above the labels in use (a corrupt label or header);
``num_classes`` sets it explicitly (every label must be below it).

Validation: there is no official split. ``val_fraction`` (default 0) holds out that fraction of the
images (a seeded random slice, removed from training) for closed-set classification accuracy; with 0,
``val_set`` is None and ``val_loader()`` returns None -- face models are judged by verification
(LFW/CFP-FP/AgeDB-30, ``marginlab.eval``) instead.

Decoding (``decode``, see ``on_device.py``): by default the workers decode each batch with one
``torchvision.io.decode_jpeg`` call and ship uint8 images; flip and normalisation run on the training device
(the loaders yield float32 batches on it). ``decode=pil`` is the per-image PIL path, ``cuda`` decodes on the GPU,
``auto`` (the default) picks ``cuda`` on CUDA when a timed trial says it is faster, else ``cpu``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from marginlab.checks import check_float, check_positive_int
from marginlab.data.base import ClassificationData, Loaders, check_root, default_data_root, missing_data_error
from marginlab.data.face import parse_image_size
from marginlab.errors import ConfigError, DataError

FORMATS = ("auto", "rec", "folder")
GET_DATA = (
    "unzip InsightFace's faces_webface_112x112 release (train.rec, train.idx, lfw.bin, cfp_fp.bin, "
    "agedb_30.bin; listed in insightface/recognition/_datasets_) into it, or put aligned crops there as "
    "<identity>/<image>.jpg"
)


class CasiaData(ClassificationData):
    """Face training data from RecordIO or an image folder; images ``(x / 255 - 0.5) / 0.5``, random flip.

    ``image_size``: 112 (ArcFace crops) or [112, 96] (SphereFace/CosFace crops; a 112x112 crop is
    centre-cropped to 96 wide, which matches the 96x112 alignment template exactly). After ``setup``,
    ``image_size`` is an int when square and a (height, width) tuple otherwise; ``image_shape`` is
    always (height, width).
    """

    name = "casia"
    in_channels = 3

    def __init__(
        self,
        root: str | None = None,
        format: str = "auto",
        rec_prefix: str = "train",
        image_size=112,
        flip: bool = True,
        skip_corrupt: bool = False,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        num_classes: int | None = None,
        decode: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = root if root else default_data_root("faces_webface_112x112")
        if format not in FORMATS:
            raise ConfigError(f"dataset.format={format!r} is not allowed: choose one of {', '.join(FORMATS)}")
        self.format = format
        self.rec_prefix = str(rec_prefix)
        self.image_shape = parse_image_size(image_size)
        self.image_size = self.image_shape[0] if self.image_shape[0] == self.image_shape[1] else self.image_shape
        self.flip = bool(flip)
        self.skip_corrupt = bool(skip_corrupt)
        self.val_fraction = check_float("dataset.val_fraction", val_fraction, low=0.0, high=0.5)
        self.split_seed = int(split_seed)
        self.requested_classes = None if num_classes is None else check_positive_int("dataset.num_classes", num_classes)
        from marginlab.data.face.on_device import check_decode

        self.decode = check_decode(decode)
        self.device = torch.device("cuda" if self.decode == "cuda" else "cpu")  # where loaders finish batches
        self.decoder: str | None = None  # what ``decode`` resolved to (cpu, cuda or pil), set by the first loader
        self.source: str | None = None  # "rec:insightface", "rec:im2rec" or "folder" after setup
        self.skipped_records: list[str] = []
        self._index = None

    # ---- discovery -------------------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path, Path]:
        root = check_root(self.root, must_exist=False)
        if not root.is_dir():
            raise missing_data_error(f"dataset.root={str(self.root)!r} does not exist", GET_DATA)
        return root, root / f"{self.rec_prefix}.rec", root / f"{self.rec_prefix}.idx"

    def _detect(self) -> str:
        root, rec, idx = self._paths()
        if self.format != "auto":
            return self.format
        if rec.is_file() or idx.is_file():
            return "rec"
        if any(child.is_dir() for child in root.iterdir()):
            return "folder"
        raise missing_data_error(
            f"dataset.root={str(self.root)!r} holds neither {rec.name} + {idx.name} "
            f"(InsightFace RecordIO) nor identity sub-directories of aligned crops",
            GET_DATA,
        )

    def setup(self) -> None:
        fmt = self._detect()
        root, rec, idx = self._paths()
        if fmt == "rec":
            from marginlab.data.face.recordio import open_face_records

            for path in (rec, idx):
                if not path.is_file():
                    raise DataError(f"{path} is missing: RecordIO data needs both {rec.name} and {idx.name}")
            index = open_face_records(rec, idx, skip_corrupt=self.skip_corrupt, num_classes=self.requested_classes)
            self.source = f"rec:{index.style}"
            self.skipped_records = index.skipped
            count = len(index.keys)
        else:
            from marginlab.data.face.imagefolder import FolderIndex

            index = FolderIndex(root, num_classes=self.requested_classes)
            self.source = "folder"
            count = len(index.paths)
        self._index = index
        self._num_classes = int(index.num_classes)
        train_pos, val_pos = self._split(count)
        self.train_set = index.dataset(train_pos, self.image_shape, train=self.flip, skip_corrupt=self.skip_corrupt)
        self.val_set = (
            None
            if val_pos is None
            else index.dataset(val_pos, self.image_shape, train=False, skip_corrupt=self.skip_corrupt)
        )

    def _split(self, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        n_val = int(round(self.val_fraction * count))
        if n_val == 0:
            return None, None
        if n_val >= count:
            raise ConfigError(f"dataset.val_fraction={self.val_fraction!r} leaves no training images of {count}")
        perm = np.random.default_rng(self.split_seed).permutation(count)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    @property
    def num_classes(self) -> int:
        """Identities in the data (reads the index on first use)."""
        if self._index is None:
            self.setup()
        return self._num_classes

    # ---- loaders ---------------------------------------------------------------------------------------
    def loaders(self, device: torch.device) -> Loaders:
        """(train, val, None): batches finished on ``device`` (see ``decode``); no closed-set test split."""
        if self.in_memory:
            return super().loaders(device)
        if self._index is None:
            self.setup()
        self.device, self.decoder = torch.device(device), None
        return Loaders(self.train_loader(), self.val_loader(), None)

    def _loader(self, dataset, train: bool):
        from marginlab.data.face.batched import BatchedFaces, collate_decoded, collate_encoded
        from marginlab.data.face.on_device import DeviceFaceLoader, choose_decode

        if self.decoder is None:
            self.decoder = choose_decode(
                self.decode, self.device, self.train_set, self.num_workers, self.batch_size // self.world_size
            )
        if self.decoder == "pil":
            return super()._loader(dataset, train)
        encoded = self.decoder == "cuda"
        loader = super()._loader(BatchedFaces(dataset, encoded), train)
        loader.collate_fn = collate_encoded if encoded else collate_decoded
        return DeviceFaceLoader(loader, dataset, self.device, encoded)

    def train_loader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return self._loader(self.train_set, train=True)

    def val_loader(self) -> DataLoader | None:
        """The held-out slice's loader, or None when ``val_fraction`` is 0 (the default)."""
        if self._index is None:
            self.setup()
        return None if self.val_set is None else self._loader(self.val_set, train=False)
