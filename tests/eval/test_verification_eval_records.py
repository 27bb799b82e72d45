"""``marginlab eval`` keeps every evaluation: one file per checkpoint, set and time (never overwritten), a merged
record rebuilt from them, and strict JSON (null and a reason where a metric is undefined, never NaN)."""

from __future__ import annotations

import json

from marginlab.commands.cli import main


def write_bin(path, face, issame):
    images = [face.encode(face.image(i)) for i in range(2 * len(issame))]
    path.write_bytes(face.py2_bin_pickle(images, issame))
    return path


def test_evaluations_never_overwrite_and_json_has_no_nan(tmp_path, face, capsys, face_checkpoint):
    ckpt = face_checkpoint()
    mixed = write_bin(tmp_path / "lfw.bin", face, [True, False] * 5)  # nfolds=5 below: at most 5 of either kind
    one_kind = write_bin(tmp_path / "cfp_fp.bin", face, [True] * 4)
    args = [
        "eval",
        f"checkpoint={ckpt.parent.parent}",
        "verification=[lfw,cfp_fp]",
        f"verification.lfw.path={mixed}",
        f"verification.cfp_fp.path={one_kind}",
        "verification.lfw.nfolds=2",
        "verification.cfp_fp.nfolds=2",
    ]
    assert main(args) == 0
    folder = ckpt.parent / "best.eval"
    first = {p.name: p.read_bytes() for p in folder.glob("*.json")}
    assert sorted(n.split("-")[0] for n in first) == ["cfp_fp", "lfw"]
    assert len(list(folder.glob("*.png"))) == 2  # each set's ROC figure beside its record
    assert (
        main(
            [
                *args[:2],
                "verification=[lfw]",
                f"verification.lfw.path={mixed}",
                "verification.lfw.nfolds=5",
                "flip=false",
            ]
        )
        == 0
    )
    files = sorted(folder.glob("*.json"))
    assert len(files) == 3 and all(folder.joinpath(n).read_bytes() == b for n, b in first.items())  # untouched

    merged_text = (ckpt.parent / "best.eval.json").read_text()
    merged = json.loads(merged_text)
    assert [e["set"] for e in merged["evaluations"]].count("lfw") == 2 and len(merged["evaluations"]) == 3
    assert merged["results"]["lfw"]["nfolds"] == 5  # the latest lfw evaluation at the top, keyed by set
    assert merged["results"]["cfp_fp"]["nfolds"] == 2 and merged["epoch"] == 4
    latest = json.loads((folder / merged["files"]["lfw"].split("/")[-1]).read_text())
    assert latest["options"]["flip"] is False and latest["options"]["nfolds"] == 5 and latest["set"] == "lfw"
    assert merged["lfw/acc"] == latest["scalars"]["lfw/acc"] == latest["result"]["accuracy"]

    for text in [merged_text] + [p.read_text() for p in files]:
        assert "NaN" not in text and "Infinity" not in text
    assert merged["cfp_fp/auc"] is None and merged["nonfinite"]["cfp_fp/auc"] == "nan"
    reason = merged["results"]["cfp_fp"]["undefined"]["auc"]
    assert reason == "undefined: every one of the 4 pairs is a same-identity pair (an ROC needs both kinds)"
    out = capsys.readouterr().out
    assert "best.eval/lfw-" in out and "cfp_fp: acc" in out
