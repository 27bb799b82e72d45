"""Aligned face crops in an ImageFolder tree: ``<root>/<identity>/<image>.jpg`` (torchvision's layout).

The tree is listed by ``torchvision.datasets.ImageFolder`` (classes sorted by folder name, label = rank);
images are decoded here so that an unreadable file gives a DataError naming it.
"""

from __future__ import annotations

import os

import numpy as np
from torchvision.datasets import ImageFolder

from marginlab.data.base import check_no_link_loops
from marginlab.data.face import FaceImageDataset, class_count
from marginlab.errors import DataError


class FolderIndex:
    """The listing of an ImageFolder tree: paths, labels and class names (``num_classes``: the identity
    folders, or ``num_classes`` when given, every label below it)."""

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None):
        check_no_link_loops(root)  # ImageFolder follows symbolic links: a loop would list the tree over and over
        try:
            folder = ImageFolder(str(root), loader=lambda path: path)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"{root}: not a usable image folder ({exc}); expected <root>/<identity>/<image>.jpg "
                f"with one sub-directory per identity"
            ) from None
        self.root = str(root)
        self.classes: list[str] = list(folder.classes)
        self.paths: list[str] = [path for path, _ in folder.samples]
        self.labels = np.array([label for _, label in folder.samples], dtype=np.int64)
        self.num_classes = class_count(
            self.labels,
            len(self.classes),
            num_classes,
            self.describe,
            f"{root} has {len(self.classes)} identity folders",
        )

    def describe(self, i: int) -> str:
        """The file of image ``i`` and its identity folder, for messages."""
        return f"{self.paths[i]} (identity folder {self.classes[self.labels[i]]!r})"

    def dataset(
        self, positions: np.ndarray | None, image_size: tuple[int, int], train: bool, skip_corrupt: bool = False
    ) -> "FolderFaceDataset":
        sel = np.arange(len(self.paths)) if positions is None else np.asarray(positions)
        return FolderFaceDataset([self.paths[i] for i in sel], self.labels[sel], image_size, train, skip_corrupt)


class FolderFaceDataset(FaceImageDataset):
    def __init__(
        self, paths: list[str], labels: np.ndarray, image_size: tuple[int, int], train: bool, skip_corrupt: bool = False
    ):
        super().__init__(image_size, train, skip_corrupt)
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def raw(self, index: int) -> tuple[str, int]:
        return self.paths[index], int(self.labels[index])
