"""The ``paper:`` block of an experiment config: a paper's published numbers, put beside ours by the report.

    paper:
      source: "L-Softmax (Liu et al., ICML 2016)"    # who published the numbers
      table: "Table 2, CIFAR-10 error (%)"           # where
      metric: test/acc          # what the paper's number measures, as a metrics.json key
      compare: best/test/acc    # optional: the metrics.json key ours is read from (default: metric), e.g. the
                                # best epoch's value where the paper reports the best during training
      unit: error_percent       # how the paper states it: error_percent = 100 (1 - x), percent = 100 x, same = x
      confidence: unverified    # default mark: repo | cited | unverified (see shared/reference/papers.md)
      evidence: "..."           # repo: the official repository's file that holds the number (owner/name/path);
                                # cited: who quotes it and where; unverified: optional
      note: "..."               # optional: what differs from the paper's setting
      results:                  # one entry per setting of the table
        - {match: {head.m: 1}, value: 9.05, note: "softmax = L-Softmax with m = 1"}
        - {match: {head.m: 4}, value: 7.58, confidence: cited, evidence: "X et al., Table 3"}

``match`` keys are config-group choices (``head: arcface``, ``regularizer: center``) or dotted config keys
(``head.m: 0.35``) of the job's saved config; an empty ``match`` fits every job. An entry may override
``metric``, ``compare``, ``unit``, ``confidence``, ``evidence``, ``source``, ``table`` (one setting can carry
numbers for several metrics, e.g. LFW and CFP-FP). The first entry that fits a row per metric is shown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from marginlab.errors import ConfigError

CONFIDENCE = {
    "repo": "read in the official repository or the paper's full text",
    "cited": "quoted by a third party, not read in the paper",
    "unverified": "not confirmed from a source: approximate",
}
UNITS: dict[str, Callable[[float], float]] = {
    "error_percent": lambda x: 100.0 * (1.0 - x),
    "percent": lambda x: 100.0 * x,
    "same": lambda x: x,
}
BLOCK_KEYS = {"source", "table", "metric", "compare", "unit", "confidence", "evidence", "note", "results"}
RESULT_KEYS = {"match", "value", "metric", "compare", "unit", "confidence", "evidence", "source", "table", "note"}
#: a file path in an official repository: owner/name/path/file.ext (a [repo] mark's evidence names one)
REPO_FILE = re.compile(r"[\w.-]+/[\w.-]+/[\w./+-]*[\w-]\.[A-Za-z0-9]+")


@dataclass(frozen=True)
class PaperValue:
    source: str
    table: str
    metric: str
    unit: str
    value: float
    confidence: str
    note: str = ""
    compare: str = ""  # the metrics.json key ours is read from; "" = metric
    evidence: str = ""

    @property
    def measured(self) -> str:
        """The metrics.json key compared with the paper's number."""
        return self.compare or self.metric

    @property
    def label(self) -> str:
        """Column label: ``test err %``, ``lfw/acc %``, ``test/loss``; ``... vs best/test/acc`` when ours is read
        from another key than the paper's metric."""
        if self.unit == "error_percent":
            label = f"{self.metric.rpartition('/')[0] or self.metric} err %"
        elif self.unit == "percent":
            label = f"{self.metric} %"
        else:
            label = self.metric
        return label if self.measured == self.metric else f"{label} vs {self.measured}"

    def convert(self, measured: float) -> float:
        """A measured value in the paper's unit."""
        return UNITS[self.unit](measured)


def check_paper(block: Any, where: str = "paper") -> None:
    """Raises ConfigError naming the key when the block does not follow the format above."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping (source, table, metric, unit, confidence, results)")
    unknown = set(block) - BLOCK_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(BLOCK_KEYS)}")
    results = block.get("results") or []
    if not isinstance(results, list):
        raise ConfigError(f"{where}.results must be a list")
    for i, entry in enumerate(results):
        key = f"{where}.results[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key} must be a mapping with match and value")
        unknown = set(entry) - RESULT_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown keys {sorted(unknown)}; allowed: {sorted(RESULT_KEYS)}")
        if not isinstance(entry.get("match") or {}, dict):
            raise ConfigError(f"{key}.match must be a mapping of config keys to values")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}.value={value!r} must be a number")
        merged = {**block, **entry}
        for name in ("source", "metric"):
            if not merged.get(name):
                raise ConfigError(f"{key}: no {name} (set it in the entry or in {where})")
        for name in ("metric", "compare"):
            if merged.get(name) is not None and not isinstance(merged[name], str):
                raise ConfigError(f"{key}: {name}={merged[name]!r} must be a metrics.json key such as test/acc")
        if merged.get("unit", "same") not in UNITS:
            raise ConfigError(f"{key}: unit={merged.get('unit')!r}; choose one of {', '.join(UNITS)}")
        if merged.get("confidence") not in CONFIDENCE:
            raise ConfigError(
                f"{key}: confidence={merged.get('confidence')!r}; choose one of "
                f"{', '.join(CONFIDENCE)} (the marks of papers.md)"
            )
        evidence = str(merged.get("evidence") or "")
        if merged["confidence"] == "repo" and not REPO_FILE.search(evidence):
            raise ConfigError(
                f"{key}: confidence=repo needs evidence naming the official repository's file that "
                f"holds the number (owner/name/path), got {evidence!r}"
            )
        if merged["confidence"] == "cited" and not evidence.strip():
            raise ConfigError(f"{key}: confidence=cited needs evidence naming who quotes the number, and where")


def _equal(expected: Any, actual: Any) -> bool:
    if actual is None or actual in ([], {}):
        return expected is None or expected in ([], {}) or str(expected).lower() in ("null", "none")
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(_equal, expected, actual))
    return str(expected) == str(actual)


def paper_values(block: Any, lookup: Callable[[str], Any]) -> list[PaperValue]:
    """The paper's numbers for one setting (``lookup(key)`` reads the job's choices/config), one per metric."""
    if not isinstance(block, dict):
        return []
    found: dict[tuple[str, str], PaperValue] = {}
    for entry in block.get("results") or []:
        if not isinstance(entry, dict) or not all(_equal(v, lookup(k)) for k, v in (entry.get("match") or {}).items()):
            continue
        merged = {**block, **entry}
        value = PaperValue(
            source=str(merged.get("source", "")),
            table=str(merged.get("table", "")),
            metric=str(merged.get("metric", "")),
            unit=str(merged.get("unit") or "same"),
            value=float(merged["value"]),
            confidence=str(merged.get("confidence", "unverified")),
            note=str(entry.get("note") or ""),
            compare=str(merged.get("compare") or ""),
            evidence=str(merged.get("evidence") or ""),
        )
        found.setdefault((value.metric, value.measured, value.unit), value)
    return list(found.values())
