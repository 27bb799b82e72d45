"""`marginlab train dataset=casia verification=[lfw]` and `marginlab eval` on generated real-format files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from marginlab.commands.cli import main
from marginlab.data.face.recordio import write_face_records

IDENTITIES, PER_ID = 4, 6


@pytest.fixture
def face_data(tmp_path, face):
    casia = tmp_path / "casia"
    write_face_records(
        casia, [(face.encode(face.image(10 * i + j)), i) for i in range(IDENTITIES) for j in range(PER_ID)]
    )
    bins, issame = [], []
    for pair in range(20):  # 10 matched + 10 mismatched pairs
        a = pair % IDENTITIES
        b = a if pair % 2 == 0 else (a + 1) % IDENTITIES
        bins += [face.encode(face.image(10 * a + pair % PER_ID)), face.encode(face.image(10 * b + 5))]
        issame.append(a == b)
    lfw = tmp_path / "lfw.bin"
    lfw.write_bytes(pickle.dumps((bins, issame)))
    return casia, lfw


def test_train_on_casia_records_with_lfw_verification_then_eval(face_data, run_train, metrics, capsys):
    casia, lfw = face_data
    code, run_dir = run_train(
        "dataset=casia",
        f"dataset.root={casia}",
        "dataset.batch_size=8",
        "dataset.num_workers=0",
        "verification=[lfw]",
        f"verification.lfw.path={lfw}",
        "verification.lfw.batch_size=16",
        "backbone=sfnet4",
        "head=arcface",
        "logger=quiet",
        "logger.figures=true",
        "trainer.epochs=1",
    )
    assert code == 0
    rows = metrics[1](run_dir)
    for key in ("lfw/acc", "lfw/acc_std", "lfw/threshold", "lfw/tar_at_far", "lfw/auc", "lfw/eer"):
        assert key in rows[-1] and np.isfinite(rows[-1][key])
    summary = metrics[0](run_dir)
    assert summary["best_metric"] == "lfw/acc" and "test/acc" not in summary  # CASIA has no closed-set split
    assert (run_dir / "figures" / "roc_lfw.png").stat().st_size > 1000
    capsys.readouterr()

    assert main(["eval", f"checkpoint={run_dir}", "verification=[lfw]", f"verification.lfw.path={lfw}"]) == 0
    result = json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())
    assert result["lfw/acc"] == pytest.approx(rows[-1]["lfw/acc"])  # same weights, same protocol
    assert set(result["results"]["lfw"]) >= {"accuracy", "tpr", "fpr", "auc"}
    assert "lfw: acc" in capsys.readouterr().out


def test_partial_fc_on_two_processes_then_eval(face_data, torchrun, tmp_path, capsys):
    """The face path under torchrun with a sharded head: no validation split, so no rank builds a full head;
    rank 0 verifies with the backbone and saves the gathered, unsharded head."""
    casia, lfw = face_data
    out = tmp_path / "pfc"
    torchrun.launch(
        2,
        out,
        "dataset=casia",
        f"dataset.root={casia}",
        "dataset.batch_size=8",
        "dataset.num_workers=0",
        "verification=[lfw]",
        f"verification.lfw.path={lfw}",
        "verification.lfw.batch_size=16",
        "backbone=sfnet4",
        "head=arcface",
        "head.partial_fc.sample_rate=0.5",
        "logger=quiet",
        "trainer.epochs=1",
    )
    (record,) = torchrun.epochs(out)
    assert np.isfinite(record["train/loss"]) and np.isfinite(record["lfw/acc"])
    (run_dir,) = list((out / "runs").iterdir())
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"]["head.weight"].shape[0] == IDENTITIES  # both ranks' classes
    assert main(["eval", f"checkpoint={run_dir}", "verification=[lfw]", f"verification.lfw.path={lfw}"]) == 0
    result = json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())
    assert result["lfw/acc"] == pytest.approx(record["lfw/acc"])
    capsys.readouterr()


def test_eval_without_checkpoint_is_a_clear_error(capfd):
    assert main(["eval", "verification=[lfw]"]) == 2
    assert "checkpoint is missing" in capfd.readouterr().err
