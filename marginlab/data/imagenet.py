"""ImageNet (ILSVRC-2012) through torchvision: an unpacked class-folder tree, or the official archives.

Per split, ``<root>/<split>/<wnid>/*.JPEG`` is read with ``torchvision.datasets.ImageFolder``; when that
folder is absent but the archives are in ``root``, ``torchvision.datasets.ImageNet`` unpacks them into it
(a one-off that takes hours for the training archive). ImageNet cannot be downloaded automatically.

ILSVRC's val/ has public labels and no test set does, so val/ serves as the test split (as in the papers);
model selection uses a validation split held out of train/ (``val_fraction``, default 0.01: ~12.8k images,
~13 per class, against 10% for the small sets: enough to rank checkpoints, 1% of the training images).
"""

from __future__ import annotations

from PIL import Image
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets import imagenet as tv_imagenet
from torchvision.datasets.folder import default_loader

from marginlab.checks import check_positive_int
from marginlab.data.base import ClassificationData, check_no_link_loops, check_root, evaluation_copy, missing_data_error
from marginlab.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet training-set RGB mean/std (torchvision's)
DOWNLOAD_PAGE = "https://image-net.org/download-images"


def load_image(path: str, title: str = "ImageNet") -> Image.Image:
    """torchvision's default loader (an RGB PIL image); an unreadable file becomes a DataError naming it."""
    try:
        return default_loader(path)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DataError(
            f"{title} image {path} is unreadable or corrupted ({err}). To fix: delete or replace it"
        ) from err


def imagenet_transform(size: int, augment: bool) -> T.Compose:
    """Random-resized crop + flip when ``augment``, else the usual resize-to-256, centre-crop-224 evaluation
    scaled to ``size``; then ImageNet normalisation."""
    if augment:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(256 * size / 224)), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


def _wnids(dataset: datasets.ImageFolder) -> list[str]:
    """The class folder names, in label order (ImageNet renames ``classes`` but keeps ``wnids``)."""
    return getattr(dataset, "wnids", dataset.classes)


class ImageNetData(ClassificationData):
    """ILSVRC-2012 classification; ``num_classes`` is the number of class folders in ``train/``."""

    name = "imagenet"
    in_channels = 3

    def __init__(
        self,
        root: str,
        download: bool = False,
        augment: bool = True,
        image_size: int = 224,
        val_fraction: float = 0.01,
        **kwargs,
    ):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root = check_root(root, must_exist=False)
        self.download = bool(download)  # only changes the message: ImageNet has no public download
        self.augment = bool(augment)
        self.image_size = check_positive_int("dataset.image_size", image_size)

    @property
    def num_classes(self) -> int:
        """Counted from the data, so a subset (e.g. 100 wnids) works; sets the data up on first use."""
        if self.test_set is None:
            self.setup()
        return len(self.test_set.classes)  # the same folders as train/ (checked in setup)

    def transform(self, train: bool) -> T.Compose:
        return imagenet_transform(self.image_size, train and self.augment)

    def setup(self) -> None:
        """Loads both splits (ImageNet's val/ is the test split here) and holds out the validation images from
        train/; DataError naming the path when data is absent, corrupt or inconsistent."""
        train, val = self._open("train"), self._open("val")
        if _wnids(train) != _wnids(val):
            only_one = sorted(set(_wnids(train)) ^ set(_wnids(val)))
            raise DataError(
                f"ImageNet train/ and val/ in {self.root} have different class folders "
                f"({len(_wnids(train))} vs {len(_wnids(val))}; e.g. {only_one[:3]} in only one), "
                "so their labels would not match. To fix: give both the same <wnid> folders"
            )
        self.train_set, self.test_set = train, val
        self.hold_out_val()

    def evaluation_view(self, dataset: datasets.ImageFolder) -> datasets.ImageFolder:
        return evaluation_copy(dataset, self.transform(train=False))

    def _archives(self, split: str) -> list[str]:
        """The archive names torchvision's ImageNet needs to build ``split``."""
        return [tv_imagenet.ARCHIVE_META[key][0] for key in (split, "devkit")]

    def _open(self, split: str) -> datasets.ImageFolder:
        folder = self.root / split
        kwargs = dict(transform=self.transform(split == "train"), loader=load_image)
        if folder.is_dir():
            check_no_link_loops(folder)  # ImageFolder follows symbolic links: a loop would list images many times
            try:
                return datasets.ImageFolder(str(folder), **kwargs)
            except OSError as err:  # FileNotFoundError: no class folders, or a class folder without images
                raise DataError(
                    f"ImageNet {split} folder {folder} is unusable ({err}). To fix: it must hold "
                    f"one folder per class with its images ({split}/<wnid>/*.JPEG)"
                ) from err
        if not all((self.root / name).is_file() for name in self._archives(split)):
            raise self._not_found(split)
        try:
            return datasets.ImageNet(str(self.root), split=split, **kwargs)
        # RuntimeError names an archive that fails its md5 check; OSError / tarfile errors come from unpacking
        except Exception as err:
            partly = f", and delete the partly unpacked {folder}" if folder.exists() else ""
            raise DataError(
                f"could not unpack the ImageNet {split} archives in {self.root} ({err}). "
                f"To fix: replace the corrupt archive{partly}"
            ) from err

    def _not_found(self, split: str) -> DataError:
        archives = ", ".join(name for name, _md5 in tv_imagenet.ARCHIVE_META.values())
        no_download = " (dataset.download=true cannot fetch it)" if self.download else ""
        return missing_data_error(
            f"ImageNet {split} data not found in {self.root} (no {split}/<wnid>/ class folders, nor the archives "
            f"{', '.join(self._archives(split))}), and ImageNet cannot be downloaded automatically{no_download}",
            f"get {archives} from {DOWNLOAD_PAGE} (free registration) and put them in {self.root}, where "
            "torchvision unpacks them on first use; or put unpacked train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
            "folders there",
        )
