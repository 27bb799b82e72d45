"""The last line of a run: ``marginlab: completed 30/30 epochs in 41.2 s; test/acc 0.9861, ...; <run dir>``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: the metrics the line shows, when the run measured them
SHOWN = ("val/acc", "test/acc", "test/loss", "test/precision_at_1", "test/map_at_r")


def finished_line(summary: dict[str, Any], epochs: int, best_key: str, run_dir: Path | str) -> str:
    """Status, epochs and time; the metrics the run has (none missing: no empty ``; ;`` parts); best.pt; the dir."""
    keys = dict.fromkeys((*SHOWN, f"best/{best_key}", "best/test/acc"))
    shown = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if k != "best/epoch" and is_number(summary.get(k)))
    chosen = "the last epoch" if best_key == "epoch" else f"best {best_key}"
    best = f"best.pt: epoch {summary['best/epoch']} ({chosen})" if "best/epoch" in summary else ""
    head = f"marginlab: {summary['status']} {summary['epochs_done']}/{epochs} epochs in {summary['wall_time_s']:.1f} s"
    return "; ".join(part for part in (head, shown, best, str(run_dir)) if part)


def is_number(value: Any) -> bool:
    """A value to show: a number, NaN included (a diverged loss says so), not the -inf of "no best epoch yet"."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value)
