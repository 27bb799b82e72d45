"""``marginlab eval checkpoint=... verification=[ijbc]``: the numbers, the flags beside them, features cached beside
the checkpoint and reused by a re-run with other flags; a broken release is one line and exit 2."""

from __future__ import annotations

import json

from marginlab.commands.cli import main


def ijb_results(folder) -> list[dict]:
    """Every IJB result in the JSON files ``marginlab eval`` wrote beside the checkpoint."""
    found = []
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        for result in [data, data.get("result"), *(data.get("results") or {}).values()]:
            if isinstance(result, dict) and "tar_at_fars" in result:
                found.append(result)
    return found


def test_eval_command_scores_ijbc_and_reuses_its_features(ijb, tmp_path, capsys, face_checkpoint):
    ckpt = face_checkpoint("last.pt", embedding_dim=16, width=4, epoch=1)
    args = [
        "eval",
        f"checkpoint={ckpt}",
        "verification=[ijbc]",
        f"verification.ijbc.root={ijb.root}",
        "verification.ijbc.num_workers=0",
        "device=cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ijbc: TAR@FAR 1e-06 " in out and "flip=true, norm_score=true, detector_score=true" in out
    cache = ckpt.parent / "ijb_features"
    features = sorted(cache.glob("ijbc-*.npy"))
    assert len(features) == 1
    assert list(ckpt.parent.rglob("*ijbc*.png"))  # the ROC figure
    results = ijb_results(ckpt.parent)
    assert results and set(results[0]["tar_at_fars"]) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert results[0]["flags"] == {"flip": True, "norm_score": True, "detector_score": True}
    stamp = features[0].stat().st_mtime_ns

    assert main([*args, "verification.ijbc.detector_score=false"]) == 0
    assert "detector_score=false" in capsys.readouterr().out
    assert sorted(cache.glob("ijbc-*.npy")) == features and features[0].stat().st_mtime_ns == stamp


def test_eval_command_names_a_missing_meta_file(ijb, tmp_path, capsys, face_checkpoint):
    ckpt = face_checkpoint("last.pt", embedding_dim=16, width=4, epoch=1)
    (ijb.root / "meta" / "ijbc_template_pair_label.txt").unlink()
    assert (
        main(["eval", f"checkpoint={ckpt}", "verification=[ijbc]", f"verification.ijbc.root={ijb.root}", "device=cpu"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("marginlab: error: ") and "meta/ijbc_template_pair_label.txt: IJB meta file not found" in err
