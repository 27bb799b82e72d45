"""During training: warnings when the geometry probe's numbers show a collapsing run.

Three signs, each read from the epoch's record (metrics.jsonl names):

- class weights collapsed: ``test/weight_angle/min_deg`` below ``WEIGHT_COLLAPSE_DEG`` and below
  ``WEIGHT_COLLAPSE_SHARE`` of the best possible min angle (marginlab/margin_feasibility.py): two classes
  share one direction, so the head cannot tell them apart;
- chance accuracy while the loss falls: ``test/acc`` under ``CHANCE_FACTOR`` / C for ``CHANCE_EPOCHS``
  evaluated epochs in a row while ``train/loss`` fell since the first of them;
- feature norms exploding: ``test/feature_norm/mean`` over ``NORM_GROWTH`` times its first evaluated value
  (or not finite).
"""

from __future__ import annotations

import math

WEIGHT_COLLAPSE_DEG = 1.0
WEIGHT_COLLAPSE_SHARE = 0.05
CHANCE_FACTOR, CHANCE_EPOCHS = 1.5, 3
NORM_GROWTH = 10.0


class CollapseWatch:
    """Keeps the few numbers of past epochs the three tests need; ``check(record)`` returns the warnings."""

    def __init__(self, num_classes: int, best_angle_deg: float | None = None):
        self.num_classes = int(num_classes)
        self.best_angle_deg = best_angle_deg
        self.first_norm: tuple[int, float] | None = None
        self.chance_run: list[tuple[int, float]] = []  # (epoch, train/loss) of consecutive chance epochs
        self.first: dict[str, str] = {}  # kind -> "epoch N: <its first warning>"

    def check(self, record: dict) -> list[str]:
        """The warnings of this epoch (empty when the record has no evaluation or nothing looks wrong)."""
        if "test/acc" not in record:
            return []
        found = {"weights": self._weights(record), "chance": self._chance(record), "norms": self._norms(record)}
        for kind, text in found.items():
            if text and kind not in self.first:
                self.first[kind] = f"epoch {record['epoch']}: {text}"
        return [text for text in found.values() if text]

    def first_warnings(self) -> list[str]:
        """The first warning of each kind, with its epoch: what metrics.json lists under ``"warnings"``."""
        return list(self.first.values())

    def _weights(self, record: dict) -> str | None:
        angle = record.get("test/weight_angle/min_deg")
        if angle is None or self.num_classes < 2:
            return None
        limit = WEIGHT_COLLAPSE_DEG
        if self.best_angle_deg is not None:
            limit = min(limit, WEIGHT_COLLAPSE_SHARE * self.best_angle_deg)
        if not angle < limit:
            return None
        best = "" if self.best_angle_deg is None else f" (best possible {self.best_angle_deg:.2f} deg)"
        return f"collapse: two class weights are {angle:.2f} deg apart{best}"

    def _chance(self, record: dict) -> str | None:
        chance = 1.0 / max(self.num_classes, 1)
        if record["test/acc"] >= CHANCE_FACTOR * chance or "train/loss" not in record:
            self.chance_run = []
            return None
        self.chance_run.append((record["epoch"], record["train/loss"]))
        (e0, l0), (_, l1) = self.chance_run[0], self.chance_run[-1]
        if len(self.chance_run) < CHANCE_EPOCHS or not l1 < l0:
            return None
        return (
            f"collapse: test/acc {record['test/acc']:.3f} is at chance ({chance:.3f}) since epoch {e0} "
            f"while train/loss fell {l0:.4g} -> {l1:.4g}"
        )

    def _norms(self, record: dict) -> str | None:
        norm = record.get("test/feature_norm/mean")
        if norm is None:
            return None
        if self.first_norm is None:
            self.first_norm = (record["epoch"], norm)
        epoch0, norm0 = self.first_norm
        if math.isfinite(norm) and not (norm0 > 0 and norm > NORM_GROWTH * norm0):
            return None
        return f"feature norms exploding: mean {norm:.4g} (epoch {epoch0}: {norm0:.4g})"
