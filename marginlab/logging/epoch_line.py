"""The one line per epoch a person reads, on the console (terminal or not) and in the run's ``train.log``.

``epoch 3/30  loss 0.4123  acc 0.9530  test/acc 0.9667  lr 0.0976  norm 21.3  theta_y 31.2deg  viol 0.041
lfw/acc 0.9812  1234 img/s  2.1 s`` (one line; ASCII only, so a log with a C locale never fails to encode it).
Values an epoch does not have (no evaluation this epoch, no verification set) are left out.
"""

from __future__ import annotations

import time
from pathlib import Path

#: (record key, label, format) of the headline numbers, in the order they are shown
HEADLINE = (
    ("train/loss", "loss", "{:.4f}"),
    ("train/acc", "acc", "{:.4f}"),
    ("test/acc", "test/acc", "{:.4f}"),
    ("val/map_at_r", "val/MAP@R", "{:.4f}"),  # retrieval sets of unseen classes (eval/retrieval_sets.py)
    ("test/precision_at_1", "test/P@1", "{:.4f}"),
    ("test/map_at_r", "test/MAP@R", "{:.4f}"),
    ("train/lr", "lr", "{:.4g}"),
    ("test/feature_norm/mean", "norm", "{:.4g}"),
    ("test/angle/target_deg", "theta_y", "{:.1f}deg"),
    ("test/margin/violation_frac", "viol", "{:.3f}"),
)
#: the record's own keys that are not verification accuracies
OWN_PREFIXES = ("train/", "test/", "head/", "time/", "best/")
LOG_NAME = "train.log"  # Hydra's job log file in the run dir (hydra.job.name is "train")


def verification_keys(record: dict) -> list[str]:
    """``<set>/acc`` of every verification set in the record, in record order."""
    return [k for k in record if k.endswith("/acc") and not k.startswith(OWN_PREFIXES)]


def format_epoch_line(record: dict, epochs: int, warnings: list[str] = ()) -> str:
    """The epoch's line from its metrics.jsonl record (and the probe's warnings, if any)."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{label} {fmt.format(record[key])}" for key, label, fmt in HEADLINE if key in record]
    parts += [f"{key} {record[key]:.4f}" for key in verification_keys(record)]
    if "train/images_per_s" in record:
        parts.append(f"{record['train/images_per_s']:.0f} img/s")
    if "time/epoch_s" in record:
        parts.append(f"{record['time/epoch_s']:.1f} s")
    parts += [f"WARNING {w}" for w in warnings]
    return "  ".join(parts)


def append_to_log(run_dir: Path, line: str, name: str = "marginlab.epoch") -> None:
    """Appends ``line`` to ``<run_dir>/train.log`` in Hydra's format (O_APPEND: safe beside Hydra's own handler)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    with open(Path(run_dir) / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(f"[{stamp}][{name}][INFO] - {line}\n")
