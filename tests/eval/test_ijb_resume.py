"""Resumable IJB feature extraction into a cache dir: a run stopped midway leaves its complete rows on disk (a
``.partial.npy`` and a sidecar counting them); the next run embeds only the rest, and the file equals that of an
uninterrupted run bit for bit. A partial file that does not fit is discarded with one log line."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.eval import ijb_data

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BATCH = 2  # 8 images: 4 batches


class Counting(nn.Module):
    """The test backbone of test_ijb_data.py, counting the images it embeds; ``on_batch(k)`` runs before batch k
    (1-based) is embedded (raise there: a run stopped after k - 1 batches)."""

    def __init__(self, on_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, 8)).eval()
        self.on_batch, self.batches, self.images = on_batch, 0, 0

    def forward(self, x):
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.batches)
        self.images += len(x)
        return self.net(x)


class Stopped(Exception):
    pass


def stop_at(k):
    def on_batch(n):
        if n == k:
            raise Stopped(f"stopped before batch {n}")

    return on_batch


def features(meta, model, cache=None):
    feats, path = ijb_data.image_features_cached(meta, model, 112, flip=False, batch_size=BATCH, cache_dir=cache)
    return np.array(feats), path


def finished_files(path):
    """What a cache dir holds after one finished extraction: the features, their key's description, the key's lock."""
    return [path.with_suffix(".json").name, path.with_suffix(".lock").name, path.name]


@pytest.fixture
def meta(ijb):
    return ijb_data.read_meta(ijb.root, "ijbc")


@pytest.fixture
def uninterrupted(meta):
    return features(meta, Counting())[0]  # no cache dir: today's temporary-directory path


def test_a_stopped_extraction_resumes_where_it_stopped(meta, uninterrupted, tmp_path, caplog):
    cache = tmp_path / "cache"
    with pytest.raises(Stopped):
        features(meta, Counting(stop_at(3)), cache)  # batches 1 and 2 (4 images) embedded
    (partial,) = cache.glob("*.partial.npy")
    sidecar = partial.with_name(partial.name.replace(".npy", ".json"))
    assert json.loads(sidecar.read_text())["rows"] == 4 and not list(cache.glob("ijbc-*[0-9a-f].npy"))

    caplog.set_level(logging.INFO, logger="marginlab.eval.ijb_data")
    model = Counting()
    feats, path = features(meta, model, cache)
    assert model.images == 4 and model.batches == 2  # only images 5..8
    assert np.array_equal(feats, uninterrupted) and feats.dtype == np.float32
    assert "resuming ijbc features at row 4 of 8" in caplog.messages
    assert sorted(p.name for p in cache.iterdir()) == finished_files(path)  # the partial file and sidecar gone
    assert json.loads(path.with_suffix(".json").read_text())["set"] == "ijbc"


def test_a_killed_run_resumes_from_its_last_checkpoint(meta, uninterrupted, tmp_path, monkeypatch):
    """The files as a SIGKILL before batch 4 leaves them (no exception handler ran): the periodic checkpoints
    alone; the sidecar never counts rows that are not in the file."""
    monkeypatch.setattr(ijb_data, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every batch
    cache, killed = tmp_path / "cache", tmp_path / "killed"

    def kill_before_4(n):
        if n == 4:
            shutil.copytree(cache, killed)
            raise Stopped

    with pytest.raises(Stopped):
        features(meta, Counting(kill_before_4), cache)
    shutil.rmtree(cache)
    killed.rename(cache)
    (partial,) = cache.glob("*.partial.npy")
    rows = json.loads(partial.with_name(partial.name.replace(".npy", ".json")).read_text())["rows"]
    assert rows == 6 and np.array_equal(np.load(partial)[:rows], uninterrupted[:rows])

    model = Counting()
    feats, _ = features(meta, model, cache)
    assert model.images == 2 and np.array_equal(feats, uninterrupted)


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("sidecar_garbage", "unreadable sidecar"),
        ("sidecar_rows", "records rows=9"),
        ("sidecar_missing", "no sidecar"),
        ("other_image_count", "records 5 images"),
        ("file_other_shape", "expected float32 (8, D)"),
        ("file_truncated", "unreadable partial file"),
    ],
)
def test_a_partial_file_that_does_not_fit_restarts(meta, uninterrupted, tmp_path, caplog, damage, reason):
    cache = tmp_path / "cache"
    with pytest.raises(Stopped):
        features(meta, Counting(stop_at(3)), cache)
    (partial,) = cache.glob("*.partial.npy")
    sidecar = partial.with_name(partial.name.replace(".npy", ".json"))
    record = json.loads(sidecar.read_text())
    if damage == "sidecar_garbage":
        sidecar.write_text('{"rows": 4, "ima')
    elif damage == "sidecar_rows":
        sidecar.write_text(json.dumps({**record, "rows": 9}))
    elif damage == "sidecar_missing":
        sidecar.unlink()
    elif damage == "other_image_count":
        sidecar.write_text(json.dumps({**record, "images": 5}))
    elif damage == "file_other_shape":
        np.save(partial, np.ones((5, 8), np.float32))
    else:
        partial.write_bytes(partial.read_bytes()[:200])

    caplog.set_level(logging.INFO, logger="marginlab.eval.ijb_data")
    model = Counting()
    feats, path = features(meta, model, cache)
    assert model.images == 8 and np.array_equal(feats, uninterrupted)  # embedded again from row 0, nothing mixed
    (line,) = [m for m in caplog.messages if "discarding" in m]
    assert reason in line and "embedding ijbc features from the start" in line
    assert not any("resuming" in m for m in caplog.messages)
    assert sorted(p.name for p in cache.iterdir()) == finished_files(path)  # the partial file and sidecar gone


def test_a_second_run_of_the_same_key_waits_and_reads_the_first_runs_file(meta, uninterrupted, tmp_path):
    """Two runs embedding the same key at once would write one partial file together: the second waits on the
    key's lock while the first holds it, then reads the first's file instead of embedding again."""
    import threading

    cache = tmp_path / "cache"
    cache.mkdir()
    key, about = ijb_data.cache_key(meta, Counting(), 112, False)
    target = cache / f"ijbc-{key}.npy"
    model, result = Counting(), {}

    def second_run():
        result["feats"], result["path"] = features(meta, model, cache)

    with ijb_data.extraction_lock(target.with_suffix(".lock"), "ijbc"):  # the first run, holding the key
        waiting = threading.Thread(target=second_run)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and model.batches == 0  # blocked: nothing embedded, no partial file
        assert not list(cache.glob("*.partial.*"))
        np.save(target, uninterrupted)  # the first run's finished file
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert model.batches == 0 and result["path"] == target  # read, not embedded again
    assert np.array_equal(result["feats"], uninterrupted)


def test_the_key_lock_is_released_when_its_holder_fails(meta, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(Stopped):
        features(meta, Counting(stop_at(2)), cache)
    (lock,) = cache.glob("*.lock")
    with ijb_data.extraction_lock(lock, "ijbc"):  # would block forever if the failed run still held it
        pass
    model = Counting()
    features(meta, model, cache)
    assert model.images == 6  # resumed after the first batch of 2
