"""During training: warnings when the geometry probe's numbers show a collapsing run.

Three signs, each read from the epoch's record (metrics.jsonl names), each calibrated so that the healthy runs
of the shipped digits experiments raise none (tests/geometry/test_collapse.py replays them):

- class weights collapsed: ``test/weight_angle/min_deg`` below ``WEIGHT_COLLAPSE_DEG`` and below
  ``WEIGHT_COLLAPSE_SHARE`` of the best possible min angle (marginlab/training/margin_feasibility.py) for
  ``WEIGHT_EPOCHS`` evaluated epochs in a row: two classes share one direction, so the head cannot tell them
  apart (a freshly initialised 2-D head passes through such an epoch and leaves it);
- chance accuracy while the loss falls: ``test/acc`` under ``CHANCE_FACTOR`` / C for ``CHANCE_EPOCHS``
  evaluated epochs in a row while ``train/loss`` fell since the first of them;
- feature norms exploding: ``test/feature_norm/mean`` not finite, or over ``NORM_GROWTH`` times its value at
  the epoch of the lowest ``train/loss`` so far while ``train/loss`` is above that low. Healthy runs grow the
  norm 10-30x from a fresh net's tiny first value while the loss falls; a blow-up grows it while the loss rises.
"""

from __future__ import annotations

import math

WEIGHT_COLLAPSE_DEG = 1.0
WEIGHT_COLLAPSE_SHARE = 0.05
WEIGHT_EPOCHS = 3
CHANCE_FACTOR, CHANCE_EPOCHS = 1.5, 3
NORM_GROWTH = 10.0


class CollapseWatch:
    """Keeps the few numbers of past epochs the three tests need; ``check(record)`` returns the warnings."""

    def __init__(self, num_classes: int, best_angle_deg: float | None = None):
        self.num_classes = int(num_classes)
        self.best_angle_deg = best_angle_deg
        self.low_loss: tuple[int, float, float] | None = None  # (epoch, train/loss, feature norm) at the lowest loss
        self.weight_run: list[int] = []  # the consecutive evaluated epochs with collapsed class weights
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
            self.weight_run = []
            return None
        self.weight_run.append(record["epoch"])
        if len(self.weight_run) < WEIGHT_EPOCHS:
            return None
        best = "" if self.best_angle_deg is None else f" (best possible {self.best_angle_deg:.2f} deg)"
        return f"collapse: two class weights are {angle:.2f} deg apart{best} since epoch {self.weight_run[0]}"

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
        norm, loss = record.get("test/feature_norm/mean"), record.get("train/loss")
        if norm is None:
            return None
        if not math.isfinite(norm):
            return f"feature norms exploding: mean {norm} (not finite)"
        if loss is None or not math.isfinite(loss):
            return None
        if self.low_loss is None or loss <= self.low_loss[1]:
            self.low_loss = (record["epoch"], loss, norm)
            return None
        epoch0, loss0, norm0 = self.low_loss
        if not (norm0 > 0 and norm > NORM_GROWTH * norm0):
            return None
        return (
            f"feature norms exploding: mean {norm:.4g}, {norm / norm0:.0f}x epoch {epoch0}'s {norm0:.4g} "
            f"while train/loss rose {loss0:.4g} -> {loss:.4g}"
        )
