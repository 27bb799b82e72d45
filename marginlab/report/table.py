"""Jobs -> one row per setting (the keys that differ between jobs, seed aside): mean +- std over seeds, failures,
the paper's numbers."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from marginlab.report.jobs import Job, as_text, is_finite_number
from marginlab.report.paper import CONFIDENCE, PaperValue, paper_values

#: metric names in which smaller is better (the best row is chosen by the first metric)
LOWER_IS_BETTER = ("loss", "err", "eer")


def lower_is_better(metric: str) -> bool:
    return any(word in metric.rpartition("/")[2] for word in LOWER_IS_BETTER)


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (n - 1); None for a single seed
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Row:
    setting: dict[str, str]
    jobs: list[Job] = field(default_factory=list)
    stats: dict[str, Stat | None] = field(default_factory=dict)
    paper: list[PaperValue] = field(default_factory=list)
    ours: dict[str, Stat | None] = field(default_factory=dict)  # per paper label: measured, in the paper's unit
    best: bool = False

    @property
    def completed(self) -> list[Job]:
        """The completed jobs averaged: a second job of the same seed (a copy, a rerun) is not another sample."""
        repeats = {id(j) for j, _ in self.duplicates}
        return [j for j in self.jobs if j.status == "completed" and id(j) not in repeats]

    @property
    def duplicates(self) -> list[tuple[Job, Job]]:
        """(job, the earlier completed job of its setting with the same seed) for each repeat of a seed."""
        first: dict[str, Job] = {}
        pairs = []
        for job in (j for j in self.jobs if j.status == "completed" and j.seed is not None):
            if as_text(job.seed) in first:
                pairs.append((job, first[as_text(job.seed)]))
            else:
                first[as_text(job.seed)] = job
        return pairs

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "failed"]

    @property
    def other(self) -> list[Job]:
        return [j for j in self.jobs if j.status not in ("completed", "failed")]


def default_metrics(jobs: list[Job]) -> list[str]:
    """With a validation split: best/val/acc (it picks the best row), then the test accuracy of best.pt and of the
    last epoch; without: test/acc. Then every other ``<set>/acc`` the jobs measured (verification sets)."""
    keys = {k for j in jobs if j.status == "completed" for k, v in j.metrics.items() if is_finite_number(v)}
    extra = sorted(
        k for k in keys if k.endswith("/acc") and k.partition("/")[0] not in ("test", "val", "train", "best", "step")
    )
    first = ["best/val/acc", "best/test/acc", "test/acc"] if "best/val/acc" in keys else ["test/acc"]
    return [*first, *extra]


def selection(jobs: list[Job]) -> str:
    """The metric the jobs chose best.pt on (metrics.json ``best_metric``); "" when none says or they differ."""
    found = {str(j.metrics["best_metric"]) for j in jobs if j.status == "completed" and j.metrics.get("best_metric")}
    return found.pop() if len(found) == 1 else ""


def column_label(metric: str, selected_on: str) -> str:
    """Which split and epoch a column is: ``test/acc (last epoch)``, ``val/acc (best)``, ``test/acc @ best val``;
    a selection on the test split is labelled optimistic."""
    if not metric.startswith("best/"):
        return f"{metric} (last epoch)" if "/" in metric else metric
    inner = metric[len("best/") :]
    optimistic = " (optimistic: chosen on test)" if selected_on.startswith("test/") else ""
    if inner == selected_on:
        return f"{inner} (best){optimistic}"
    chosen = {"": "selected epoch", "epoch": "last epoch"}.get(selected_on, f"best {selected_on.partition('/')[0]}")
    return f"{inner} @ {chosen}{optimistic}"


@dataclass
class Report:
    rows: list[Row]
    metrics: list[str]
    keys: list[str]  # setting keys that differ between rows (the row labels)
    common: dict[str, str]  # overrides shared by every row
    paper_labels: list[str]
    best_metric: str
    root: Path | None = None
    selected_on: str = ""  # the metric the runs chose best.pt on (``selection``)

    # ------------------------------------------------------------ cells
    def label(self, metric: str) -> str:
        """The column header of ``metric``: its split and epoch (``column_label``)."""
        return column_label(metric, self.selected_on)

    @staticmethod
    def fmt(x: float | None, digits: int = 4) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{x:.{digits}f}"

    def stat_cell(self, stat: Stat | None, digits: int = 4) -> str:
        if stat is None:
            return "-"
        return self.fmt(stat.mean, digits) + (f" ± {self.fmt(stat.std, digits)}" if stat.std is not None else "")

    def header(self) -> list[str]:
        cols = ["best", *(self.keys or ["setting"]), "n", "failed", *map(self.label, self.metrics)]
        for label in self.paper_labels:
            cols += [f"paper {label}", f"ours {label}", "diff"]
        return cols

    def cells(self, row: Row) -> list[str]:
        label = (
            [row.setting.get(k, "-") for k in self.keys]
            if self.keys
            else [", ".join(f"{k}={v}" for k, v in row.setting.items()) or "(defaults)"]
        )
        failed_text = "failed" if row.failed and not row.completed else "-"
        cells = [
            "best" if row.best else "",
            *label,
            str(len(row.completed)),
            str(len(row.failed)),
            *[self.metric_cell(row, m, failed_text) for m in self.metrics],
        ]
        papers = {p.label: p for p in row.paper}
        for label_ in self.paper_labels:
            paper, ours = papers.get(label_), row.ours.get(label_)
            if paper is None:
                cells += ["", self.stat_cell(ours, 2) if ours else "", ""]
                continue
            diff = f"{ours.mean - paper.value:+.2f}" if ours else "-"
            cells += [f"{paper.value:g} [{paper.confidence}]", self.stat_cell(ours, 2) if ours else failed_text, diff]
        return cells

    def metric_cell(self, row: Row, metric: str, failed_text: str) -> str:
        """The mean ± std; ``(n=k)`` when fewer than the row's completed seeds have a finite value (notes say why)."""
        stat = row.stats.get(metric)
        if not stat:
            return failed_text
        return self.stat_cell(stat) + (f" (n={stat.n})" if stat.n < len(row.completed) else "")

    # ------------------------------------------------------------ outputs
    def markdown(self) -> str:
        header = self.header()
        table = [header, *[self.cells(r) for r in self.rows]]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in self.notes()) + "\n"

    def notes(self) -> list[str]:
        direction = "lowest" if lower_is_better(self.best_metric) else "highest"
        notes = [
            f"n: seeds completed; mean ± sample std over them; failed jobs are counted, not averaged. "
            f"best: {direction} mean {self.label(self.best_metric)}."
        ]
        notes += self.split_notes()
        if self.common:
            notes.append("every job: " + " ".join(f"{k}={v}" for k, v in self.common.items()))
        papers = [p for r in self.rows for p in r.paper]
        sources = list(dict.fromkeys(f"{p.source}, {p.table}".strip(", ") for p in papers))
        if sources:
            notes.append("paper: " + "; ".join(sources) + ". diff = ours - paper, in the paper's unit.")
            compared = list(
                dict.fromkeys(
                    f"{p.label}: ours is {p.measured} ({self.label(p.measured)})"
                    for p in papers
                    if p.measured != p.metric
                )
            )
            if compared:
                notes.append("compared: " + "; ".join(compared) + " (the paper reports that statistic).")
            evidence = list(dict.fromkeys(f"{p.value:g} [{p.confidence}: {p.evidence}]" for p in papers if p.evidence))
            if evidence:
                notes.append("evidence: " + "; ".join(evidence))
            marks = list(dict.fromkeys(p.confidence for p in papers))
            notes.append("marks: " + "; ".join(f"[{m}] {CONFIDENCE.get(m, '?')}" for m in marks))
            if "unverified" in marks:
                notes.append(
                    "values marked [unverified] are approximate: do not read them as the paper's exact numbers."
                )
        block_notes = list(
            dict.fromkeys(str((j.config.get("paper") or {}).get("note") or "") for r in self.rows for j in r.jobs[:1])
        )
        notes += [f"note: {n}" for n in block_notes if n]
        notes += list(
            dict.fromkeys(
                f"note ({', '.join(f'{k}={v}' for k, v in r.setting.items())}): {p.note}"
                for r in self.rows
                for p in r.paper
                if p.note
            )
        )
        for row in self.rows:
            for job in row.failed:
                notes.append(f"failed: {self.where(job)}: {job.error}")
            for job in row.jobs:  # averaged (its result is the run's), marked: it did not train one way throughout
                if job.resume_changes:
                    notes.append(f"changed on resume: {self.where(job)}: {'; '.join(job.resume_changes)}")
            for job, first in row.duplicates:
                notes.append(
                    f"duplicate: {self.where(job)} repeats seed {job.seed} of {self.where(first)} (not averaged)"
                )
            for metric in self.metrics:  # a completed seed left out of a mean: NaN (diverged), missing, not a number
                if row.stats.get(metric):
                    notes += [
                        f"{metric} of {self.where(j)} is {j.metrics.get(metric, 'missing')} (not averaged)"
                        for j in row.completed
                        if not is_finite_number(j.metrics.get(metric))
                    ]
            for job in row.other:
                notes.append(f"{job.status}: {self.where(job)} (not averaged)")
        return notes

    def split_notes(self) -> list[str]:
        """What val and test are and what chose best.pt, when a column depends on it."""
        notes = []
        if any(m.partition("/")[0] == "val" or m.startswith("best/val/") for m in self.metrics):
            notes.append(
                "splits: val = held out of the training images (dataset.val_fraction), chooses best.pt; "
                "test = the test split, never used to choose."
            )
        if any(m.startswith("best/") for m in self.metrics):
            on = {"": "differs between runs", "epoch": "the last epoch"}.get(self.selected_on, self.selected_on)
            notes.append(f"best.pt: chosen on {on}; best/<metric> is its value at that epoch.")
        if self.selected_on.startswith("test/") or (self.best_metric.startswith("test/") and len(self.rows) > 1):
            notes.append(
                "optimistic: a choice made on the test split (best.pt or the best row) overstates its test accuracy."
            )
        return notes

    def where(self, job: Job) -> str:
        if self.root is not None and job.path.is_relative_to(self.root):
            return str(job.path.relative_to(self.root))
        return str(job.path)

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        keys = self.keys or ["setting"]
        header = [*keys, "n", "failed"]
        for m in self.metrics:
            header += [f"{m} mean", f"{m} std"]
        for label in self.paper_labels:
            header += [
                f"paper {label}",
                f"paper {label} confidence",
                f"paper {label} source",
                f"ours {label} mean",
                f"ours {label} std",
                f"diff {label}",
            ]
        header += ["best", "errors"]
        writer.writerow(header)
        num = lambda x: "" if x is None else repr(float(x))
        for row in self.rows:
            line = self.cells(row)[1 : 1 + len(keys)] + [len(row.completed), len(row.failed)]
            for m in self.metrics:
                stat = row.stats.get(m)
                line += [num(stat.mean if stat else None), num(stat.std if stat else None)]
            papers = {p.label: p for p in row.paper}
            for label in self.paper_labels:
                paper, ours = papers.get(label), row.ours.get(label)
                line += [
                    num(paper.value) if paper else "",
                    paper.confidence if paper else "",
                    "; ".join(x for x in (f"{paper.source}, {paper.table}", paper.evidence) if x) if paper else "",
                    num(ours.mean if ours else None),
                    num(ours.std if ours else None),
                    num(ours.mean - paper.value) if (paper and ours) else "",
                ]
            line += [int(row.best), " | ".join(str(j.error) for j in row.failed)]
            writer.writerow(line)
        return out.getvalue()

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv_path = out_dir / "report.md", out_dir / "report.csv"
        md.write_text(self.markdown())
        csv_path.write_text(self.csv())
        return md, csv_path


def distinguishing_keys(jobs: list[Job]) -> list[str]:
    """The keys that tell the jobs' settings apart, each read from a job's override or else its saved config:
    overrides first, then config-group choices, then config values; a key is kept only when it splits jobs that
    the keys before it left together (``head.m`` adds nothing after ``m``). Seeds (and keys equal to the seed in
    every job) are averaged over, not labels; run management (``jobs.NOISE``) is left out."""
    candidates = list(
        dict.fromkeys(
            [
                *(k for j in jobs for k in j.setting()),
                *(k for j in jobs for k in j.group_keys()),
                *(k for j in jobs for k in j.config_keys()),
            ]
        )
    )
    keys: list[str] = []
    groups = 1 if jobs else 0
    for key in candidates:
        if all(j.label(key) == as_text(j.seed) for j in jobs):
            continue  # the seed under another name (dataset.seed: ${seed}): averaged over, like the seed
        split = len({tuple(j.label(k) for k in (*keys, key)) for j in jobs})
        if split > groups:
            keys.append(key)
            groups = split
    return keys


def build_report(jobs: list[Job], metrics: list[str] | None = None, root: Path | None = None) -> Report:
    """Groups ``jobs`` (in sweep order) by setting and averages each metric over the completed seeds."""
    keys = distinguishing_keys(jobs)
    rows: dict[tuple, Row] = {}
    for job in jobs:
        labels = {k: job.label(k) or "-" for k in keys}
        rows.setdefault(tuple(labels.values()), Row(setting={**job.setting(), **labels})).jobs.append(job)
    metrics = list(metrics or default_metrics(jobs))
    common = {k: v for k, v in next(iter(rows.values())).setting.items() if k not in keys} if rows else {}
    for row in rows.values():
        for m in metrics:
            row.stats[m] = Stat.of([float(j.metrics[m]) for j in row.completed if is_finite_number(j.metrics.get(m))])
        first = row.jobs[0]
        row.paper = paper_values(first.config.get("paper"), first.value)
        for p in row.paper:
            row.ours[p.label] = Stat.of(
                [
                    p.convert(float(j.metrics[p.measured]))
                    for j in row.completed
                    if is_finite_number(j.metrics.get(p.measured))
                ]
            )
    paper_labels = list(dict.fromkeys(p.label for r in rows.values() for p in r.paper))
    best_metric = metrics[0] if metrics else "test/acc"
    scored = [r for r in rows.values() if r.stats.get(best_metric)]
    if scored:
        sign = -1.0 if lower_is_better(best_metric) else 1.0
        max(scored, key=lambda r: sign * r.stats[best_metric].mean).best = True
    return Report(
        rows=list(rows.values()),
        metrics=metrics,
        keys=keys,
        common=common,
        paper_labels=paper_labels,
        best_metric=best_metric,
        root=root,
        selected_on=selection(jobs),
    )
