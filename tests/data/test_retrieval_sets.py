"""CUB-200-2011, Cars196, SOP and In-Shop read from tiny fake trees in each set's released layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from marginlab.data.retrieval import Cars196Data, CUB200Data, InShopData, SOPData
from marginlab.errors import ConfigError, DataError
from marginlab.training.resume import compose_train_config

from ..conftest import read_metrics, run_cli


def jpeg(path: Path, seed: int) -> str:
    """A real 24x20 JPEG of noise at ``path``; its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    return str(path)


def write_cub(root: Path, classes=(1, 2, 3, 100, 101, 102, 200), per=2) -> Path:
    """CUB_200_2011/{images.txt, image_class_labels.txt, images/<NNN.Name>/<file>.jpg}."""
    base = root / "CUB_200_2011"
    images, labels, n = [], [], 0
    for c in classes:
        for i in range(per):
            n += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            jpeg(base / "images" / rel, n)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def write_cars(root: Path, classes=(1, 2, 98, 99, 196), per=2) -> Path:
    """cars_annos.mat (an ``annotations`` struct array, 1 x N, as released) and car_ims/<NNNNNN>.jpg."""
    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O")]
    fields += [("class", "O"), ("test", "O")]
    rows, n = [], 0
    for c in classes:
        for _ in range(per):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            jpeg(root / rel, n)
            box = np.array([[1]], dtype=np.uint8)
            rows.append((np.array([rel]), box, box, box, box, np.array([[c]], dtype=np.uint8), box))
    annotations = np.array([rows], dtype=fields)
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": np.array(["a"])})
    return root


def write_sop(root: Path) -> Path:
    """Stanford_Online_Products/Ebay_{train,test}.txt (header + image_id class_id super_class_id path)."""
    base = root / "Stanford_Online_Products"
    lists = {"train": [(1, 1), (1, 1), (5, 1), (5, 1), (9, 2)], "test": [(11, 2), (11, 2), (12, 3), (12, 3)]}
    n = 0
    for split, rows in lists.items():
        lines = ["image_id class_id super_class_id path"]
        for cls, sup in rows:
            n += 1
            rel = f"bicycle_final/{cls}_{n}.JPG"
            jpeg(base / rel, n)
            lines.append(f"{n} {cls} {sup} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_inshop(root: Path) -> Path:
    """list_eval_partition.txt (a count line, a header line, image_name item_id evaluation_status), img/..."""
    rows = [(1, "train"), (1, "train"), (4, "train"), (4, "train"), (7, "query"), (7, "gallery"), (8, "query")]
    rows += [(8, "gallery"), (8, "gallery")]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for n, (item, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/id_{item:08d}/{n:02d}_1_front.jpg"
        jpeg(root / rel, n)
        lines.append(f"{rel}   id_{item:08d}   {status}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def labels(dataset) -> list[int]:
    return [int(t) for t in dataset.targets]


def test_cub_splits_classes_1_100_from_101_200(tmp_path):
    data = CUB200Data(root=str(write_cub(tmp_path)), image_size=16, batch_size=2)
    data.setup()
    assert data.num_classes == 4  # 1, 2, 3, 100 remapped to 0..3
    assert labels(data.train_set) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(data.retrieval_sets) == ["test"]
    assert labels(data.retrieval_sets["test"]) == [101, 101, 102, 102, 200, 200]
    assert data.test_set is None and data.val_set is None
    image, label = data.train_set[0]
    assert tuple(image.shape) == (3, 16, 16) and label == 0
    assert data.retrieval_sets["test"].paths[0].endswith("CUB_200_2011/images/101.Bird_101/Bird_101_0.jpg")


def test_cars196_reads_the_mat_file_and_splits_1_98_from_99_196(tmp_path):
    data = Cars196Data(root=str(write_cars(tmp_path)), image_size=16)
    data.setup()
    assert data.num_classes == 3
    assert labels(data.train_set) == [0, 0, 1, 1, 2, 2]
    assert labels(data.retrieval_sets["test"]) == [99, 99, 196, 196]
    assert data.retrieval_sets["test"].paths[0] == str(tmp_path / "car_ims" / "000007.jpg")
    assert tuple(data.retrieval_sets["test"][0][0].shape) == (3, 16, 16)


def test_sop_reads_the_official_lists(tmp_path):
    data = SOPData(root=str(write_sop(tmp_path)), image_size=16)
    data.setup()
    assert data.num_classes == 3 and labels(data.train_set) == [0, 0, 1, 1, 2]
    assert labels(data.retrieval_sets["test"]) == [11, 11, 12, 12]
    assert data.retrieval_sets["test"].paths[0] == str(tmp_path / "Stanford_Online_Products/bicycle_final/11_6.JPG")


def test_inshop_gives_query_and_gallery(tmp_path):
    data = InShopData(root=str(write_inshop(tmp_path)), image_size=16)
    data.setup()
    assert data.num_classes == 2 and labels(data.train_set) == [0, 0, 1, 1]
    assert list(data.retrieval_sets) == ["query", "gallery"]
    assert labels(data.retrieval_sets["query"]) == [7, 8]
    assert labels(data.retrieval_sets["gallery"]) == [7, 8, 8]
    assert {name: len(loader.dataset) for name, loader in data.retrieval_loaders().items()} == {
        "query": 2,
        "gallery": 3,
    }


@pytest.mark.parametrize(
    "cls, missing, where",
    [
        (CUB200Data, "CUB_200_2011/images.txt", "https://www.vision.caltech.edu/datasets/cub_200_2011/"),
        (Cars196Data, "cars_annos.mat", "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"),
        (SOPData, "Stanford_Online_Products/Ebay_train.txt", "https://cvgl.stanford.edu/projects/lifted_struct/"),
        (
            InShopData,
            "list_eval_partition.txt",
            "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        ),
    ],
)
def test_a_missing_file_is_named_with_where_to_get_the_set(tmp_path, cls, missing, where):
    with pytest.raises(DataError) as err:
        cls(root=str(tmp_path / "empty")).setup()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "empty" / missing) in message and where in message


def test_a_missing_class_list_is_named(tmp_path):
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match="image_class_labels.txt not found"):
        CUB200Data(root=str(tmp_path)).setup()


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    write_sop(tmp_path)
    listing = tmp_path / "Stanford_Online_Products" / "Ebay_test.txt"
    listing.write_text(listing.read_text() + "13 oops\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt line 6 is '13 oops'"):
        SOPData(root=str(tmp_path)).setup()


def test_an_unreadable_mat_file_is_named(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cars_annos.mat is unreadable"):
        Cars196Data(root=str(tmp_path)).setup()


def test_a_missing_image_is_named_when_read(tmp_path):
    data = CUB200Data(root=str(write_cub(tmp_path)))
    data.setup()
    Path(data.train_set.paths[0]).unlink()
    with pytest.raises(DataError, match="Bird_1_0.jpg is unreadable"):
        data.train_set[0]


def test_val_fold_holds_out_a_class_disjoint_fold_as_a_retrieval_set(tmp_path):
    data = CUB200Data(root=str(write_cub(tmp_path)), num_folds=2, val_fold=1)
    data.setup()
    assert labels(data.retrieval_sets["val"]) == [3, 3, 100, 100]  # sorted [1, 2, 3, 100], second half
    assert data.num_classes == 2 and labels(data.train_set) == [0, 0, 1, 1]
    assert list(data.retrieval_sets) == ["val", "test"]


def test_val_fold_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="dataset.val_fold=4 is not allowed: choose 0 to 3"):
        CUB200Data(root="x", val_fold=4)


def test_val_fraction_holds_out_images_of_the_training_classes(tmp_path):
    data = CUB200Data(root=str(write_cub(tmp_path, per=4)), val_fraction=0.25)
    data.setup()
    assert len(data.train_set) == 12 and sorted(labels(data.val_set.dataset)) == sorted(labels(data.train_set.dataset))
    assert len(data.val_set) == 4


def test_class_balanced_training_loader(tmp_path):
    data = CUB200Data(root=str(write_cub(tmp_path, per=3)), image_size=8, samples_per_class=2, batch_size=4)
    loader = data.train_loader()
    data.set_epoch(0)
    batches = [y.tolist() for _, y in loader]
    assert len(batches) == 3  # 12 images // 4
    for y in batches:
        assert sorted(np.unique(y, return_counts=True)[1]) == [2, 2]


def test_cub200_config_composes_and_trains_one_epoch(tmp_path, run_train):
    root = write_cub(tmp_path / "cub")
    overrides = ["dataset=cub200", f"dataset.root={root}", "dataset.image_size=28", "dataset.batch_size=4"]
    overrides += ["dataset.num_workers=0", "backbone=digits_cnn", "trainer.epochs=1", "logger.tensorboard=false"]
    overrides += ["logger.figures=false", "logger.progress=false", "dataset.samples_per_class=2"]
    cfg = compose_train_config(overrides)
    assert cfg.dataset._target_ == "marginlab.data.retrieval.CUB200Data" and cfg.dataset.samples_per_class == 2
    code, run_dir = run_train(*overrides)
    assert code == 0
    assert read_metrics(run_dir)["best_metric"] == "epoch"


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop"])
def test_every_retrieval_config_composes(tmp_path, name):
    cfg = compose_train_config([f"dataset={name}", f"dataset.root={tmp_path}", "dataset.val_fold=0"])
    assert cfg.dataset.root == str(tmp_path) and cfg.dataset.val_fold == 0


def test_train_on_a_missing_set_is_one_error_line(tmp_path, capsys):
    code = run_cli("train", "dataset=sop", f"dataset.root={tmp_path}", "backbone=digits_cnn", "trainer.epochs=1")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("marginlab: error: Stanford Online Products file ") and "Ebay_train.txt" in lines[0]


def test_in_memory_is_refused():
    with pytest.raises(ConfigError, match="dataset.in_memory=true is not allowed for CUB-200-2011"):
        CUB200Data(root="x", in_memory=True)


def test_an_unknown_option_is_refused_at_compose(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_clas"):
        compose_train_config(["dataset=cub200", "+dataset.samples_per_clas=2"])
