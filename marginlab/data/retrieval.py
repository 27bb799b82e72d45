"""The four metric-learning retrieval benchmarks, read from each set's own released layout in ``root``
(nothing is downloaded): CUB-200-2011, Cars196, Stanford Online Products and DeepFashion In-Shop.

Train and test classes are disjoint (the standard split of Oh Song et al. 2016, "Deep Metric Learning via
Lifted Structured Feature Embedding", sec. 5; In-Shop: Liu et al. 2016, "DeepFashion"). The training split
trains the head as a classifier over its classes (labels remapped to 0..C-1); the test images, which no
classifier can score, are the ``retrieval_sets`` (In-Shop: ``query`` and ``gallery``), labelled with the
set's own class ids. ``val_fold`` holds out fold i of ``num_folds`` class-disjoint folds of the training
classes as the ``val`` retrieval set (class_balanced.class_disjoint_fold); ``val_fraction`` instead holds out
images of the training classes for closed-set accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from marginlab.checks import check_positive_int
from marginlab.data.base import ClassificationData, SeededDataset, check_root, dataset_labels, missing_data_error
from marginlab.data.class_balanced import ClassBalancedBatchSampler, class_disjoint_fold
from marginlab.data.imagenet import imagenet_transform, load_image
from marginlab.errors import ConfigError, DataError

#: (paths, class ids) of one split
Split = tuple[list[str], np.ndarray]


class ImageList(Dataset):
    """Images given by path, with their labels as ``targets`` (what ``dataset_labels`` reads)."""

    def __init__(self, paths: list[str], targets: np.ndarray, transform, title: str):
        self.paths, self.targets, self.transform, self.title = paths, np.asarray(targets), transform, title

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.paths[i], self.title)), int(self.targets[i])


class RetrievalData(ClassificationData):
    """Base of the four sets: subclasses give ``title``, ``url``, ``archive`` and ``read_splits``."""

    in_channels = 3
    title: str
    url: str  # where the set is published
    archive: str  # what to fetch from there and unpack into root

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        augment: bool = True,
        samples_per_class: int = 0,
        num_folds: int = 4,
        val_fold: int | None = None,
        val_fraction: float = 0.0,
        **kwargs,
    ):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root = check_root(root, must_exist=False)
        self.image_size = check_positive_int("dataset.image_size", image_size)
        self.augment = bool(augment)
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 0:
            raise ConfigError(
                f"dataset.samples_per_class={samples_per_class!r} is not allowed: an integer >= 0 (0: random batches)"
            )
        self.samples_per_class = samples_per_class
        if self.in_memory:  # the in-memory path stacks equal-sized images; these differ, so batches decode them
            raise ConfigError(f"dataset.in_memory=true is not allowed for {self.title}: its images differ in size")
        self.num_folds, self.val_fold = num_folds, val_fold
        if val_fold is not None:
            class_disjoint_fold(range(num_folds), num_folds, val_fold)  # checks both now, not at setup
        if val_fold is not None and val_fraction:
            raise ConfigError(
                f"dataset.val_fold={val_fold} and dataset.val_fraction={val_fraction} are not allowed together: "
                "validate on held-out classes (val_fold) or held-out images (val_fraction), not both"
            )
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """The training classes (after the validation fold is taken out); sets the data up on first use."""
        if self._num_classes is None:
            self.setup()
        return self._num_classes

    def read_splits(self) -> dict[str, Split]:
        """``train`` and ``test`` (In-Shop: ``train``, ``query``, ``gallery``): paths and class ids."""
        raise NotImplementedError

    def file(self, *parts: str) -> Path:
        """``root/parts``; DataError naming it and where to get the set when it is absent."""
        path = self.root.joinpath(*parts)
        if not path.is_file():
            raise missing_data_error(
                f"{self.title} file {path} not found",
                f"download {self.archive} from {self.url} and unpack it into {self.root}",
            )
        return path

    def rows(self, path: Path, skip: int, ok, expected: str):
        """The whitespace-split fields of each non-empty line of ``path`` after ``skip`` header lines; a line
        whose fields fail ``ok`` is a DataError naming the file, the line and what was ``expected``."""
        for number, line in enumerate(path.read_text().splitlines()[skip:], skip + 1):
            fields = line.split()
            if fields and not ok(fields):
                raise DataError(f"{self.title} file {path} line {number} is {line.strip()!r}: expected {expected}")
            if fields:
                yield fields

    def setup(self) -> None:
        splits = self.read_splits()
        paths, labels = splits.pop("train")
        evaluation = imagenet_transform(self.image_size, augment=False)
        if self.val_fold is not None:  # a class-disjoint fold of the training classes becomes a retrieval set
            held = np.isin(labels, class_disjoint_fold(labels, self.num_folds, self.val_fold))
            splits = {"val": ([p for p, h in zip(paths, held) if h], labels[held]), **splits}
            paths, labels = [p for p, h in zip(paths, held) if not h], labels[~held]
        if not paths:
            raise DataError(f"{self.title} in {self.root} lists no training image: nothing to train on")
        classes, targets = np.unique(labels, return_inverse=True)  # the head's classes are 0..C-1
        self._num_classes = int(classes.size)
        transform = imagenet_transform(self.image_size, self.augment)
        self.train_set = ImageList(paths, targets, transform, self.title)
        self.retrieval_sets = {name: ImageList(p, y, evaluation, self.title) for name, (p, y) in splits.items()}
        self.hold_out_val()

    def evaluation_view(self, dataset: ImageList) -> ImageList:
        return ImageList(dataset.paths, dataset.targets, imagenet_transform(self.image_size, False), self.title)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if not (train and self.samples_per_class):
            return super()._loader(dataset, train)
        if self.world_size > 1:  # each rank would need its own class draws: not written yet
            raise ConfigError("dataset.samples_per_class > 0 is not supported with several processes yet")
        labels = dataset_labels(dataset)
        sampler = self._sampler = ClassBalancedBatchSampler(
            labels, self.batch_size, self.samples_per_class, self.seed, key=(self.seed, self.rank, 0)
        )
        if len(sampler) == 0:
            raise ConfigError(
                f"dataset.batch_size={self.batch_size} gives 0 class-balanced batches: the training set has "
                f"{len(labels)} images. To fix: lower dataset.batch_size"
            )
        return DataLoader(
            SeededDataset(dataset),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )


def by_class_range(paths: list[str], labels: np.ndarray, first_test: int) -> dict[str, Split]:
    """Classes below ``first_test`` train, the rest test (CUB and Cars196 number their classes from 1)."""
    train = labels < first_test
    return {
        "train": ([p for p, t in zip(paths, train) if t], labels[train]),
        "test": ([p for p, t in zip(paths, train) if not t], labels[~train]),
    }


class CUB200Data(RetrievalData):
    """CUB-200-2011 (Wah et al. 2011): ``root/CUB_200_2011/{images.txt, image_class_labels.txt, images/}``;
    classes 1-100 train, 101-200 test (as pytorch-metric-learning's CUB reader)."""

    name = "cub200"
    title = "CUB-200-2011"
    url = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
    archive = "CUB_200_2011.tgz"

    def id_table(self, name: str) -> dict[int, str]:
        """``<image id> <value>`` per line of CUB_200_2011/<name>."""
        path = self.file("CUB_200_2011", name)
        ok = lambda fields: len(fields) == 2 and fields[0].isdigit()  # noqa: E731
        return {int(i): value for i, value in self.rows(path, 0, ok, "'<image id> <value>'")}

    def read_splits(self) -> dict[str, Split]:
        images, classes = self.id_table("images.txt"), self.id_table("image_class_labels.txt")
        unlabelled = sorted(set(images) - set(classes))
        if unlabelled:
            raise DataError(
                f"{self.title}: image id {unlabelled[0]} of images.txt has no line in image_class_labels.txt "
                f"({len(unlabelled)} such ids) in {self.root / 'CUB_200_2011'}"
            )
        ids = sorted(images)
        folder = self.root / "CUB_200_2011" / "images"
        return by_class_range([str(folder / images[i]) for i in ids], np.array([int(classes[i]) for i in ids]), 101)


class Cars196Data(RetrievalData):
    """Stanford Cars (Krause et al. 2013): ``root/cars_annos.mat`` (its ``annotations`` struct's
    ``relative_im_path`` and ``class``, as powerful-benchmarker's Cars196 reader) and ``root/car_ims/``;
    classes 1-98 train, 99-196 test."""

    name = "cars196"
    title = "Cars196"
    url = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
    archive = "car_ims.tgz and cars_annos.mat"

    def read_splits(self) -> dict[str, Split]:
        from scipy.io import loadmat

        path = self.file("cars_annos.mat")
        try:
            annotations = loadmat(str(path))["annotations"][0]
            paths = [str(self.root / str(a["relative_im_path"][0])) for a in annotations]
            labels = np.array([int(a["class"][0, 0]) for a in annotations])
        except Exception as err:  # scipy's ValueError / MatReadError, or a struct without these fields
            raise DataError(
                f"{self.title} file {path} is unreadable ({type(err).__name__}: {err}): expected the released "
                "MATLAB file with an 'annotations' struct (relative_im_path, class)"
            ) from err
        return by_class_range(paths, labels, 99)


class SOPData(RetrievalData):
    """Stanford Online Products (Oh Song et al. 2016): ``root/Stanford_Online_Products/Ebay_{train,test}.txt``
    (a header line, then ``image_id class_id super_class_id path``; as pytorch-metric-learning's reader)."""

    name = "sop"
    title = "Stanford Online Products"
    url = "https://cvgl.stanford.edu/projects/lifted_struct/"
    archive = "Stanford_Online_Products.zip"

    def read_list(self, split: str) -> Split:
        path = self.file("Stanford_Online_Products", f"Ebay_{split}.txt")
        ok = lambda fields: len(fields) == 4 and fields[1].isdigit()  # noqa: E731
        rows = list(self.rows(path, 1, ok, "'image_id class_id super_class_id path'"))  # line 1: column names
        return [str(path.parent / r[3]) for r in rows], np.array([int(r[1]) for r in rows], dtype=np.int64)

    def read_splits(self) -> dict[str, Split]:
        return {"train": self.read_list("train"), "test": self.read_list("test")}


class InShopData(RetrievalData):
    """DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016): ``root/list_eval_partition.txt`` (a count
    line, a column-name line, then ``image_name item_id evaluation_status``, status train / query / gallery)
    and the images it names (``img/...``) under ``root``. Item ``id_00000001`` has class id 1."""

    name = "inshop"
    title = "DeepFashion In-Shop"
    url = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
    archive = "Img/img.zip and Eval/list_eval_partition.txt"

    def read_splits(self) -> dict[str, Split]:
        path = self.file("list_eval_partition.txt")
        splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
        ok = lambda f: len(f) == 3 and f[1].startswith("id_") and f[1][3:].isdigit() and f[2] in splits  # noqa: E731
        # lines 1-2: the image count and the column names
        for image, item, status in self.rows(path, 2, ok, "'image_name id_<number> train|query|gallery'"):
            splits[status][0].append(str(self.root / image))
            splits[status][1].append(int(item[3:]))
        return {name: (p, np.array(y, dtype=np.int64)) for name, (p, y) in splits.items()}


#: the configs' classes, by config name
SETS = {cls.name: cls for cls in (CUB200Data, Cars196Data, SOPData, InShopData)}
