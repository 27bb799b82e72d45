"""Jobs -> one row per setting (the keys that differ between jobs, seed aside): mean +- std over seeds, failures,
the paper's numbers."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from marginlab.files import replace_text
from marginlab.report.jobs import Job, as_text, is_finite_number
from marginlab.report.paper import CONFIDENCE, PaperValue, paper_values
from marginlab.report.settings import Comparison, compare
from marginlab.report.stats import MAX_SEEDS, Summary, VsBest, summarize, versus_best

#: metric names in which smaller is better (the best row is chosen by the first metric)
LOWER_IS_BETTER = ("loss", "err", "eer")


def lower_is_better(metric: str) -> bool:
    return any(word in metric.rpartition("/")[2] for word in LOWER_IS_BETTER)


@dataclass
class Row:
    setting: dict[str, str]
    jobs: list[Job] = field(default_factory=list)
    stats: dict[str, Summary | None] = field(default_factory=dict)
    paper: list[PaperValue] = field(default_factory=list)
    ours: dict[str, Summary | None] = field(default_factory=dict)  # per paper label: measured, in the paper's unit
    best: bool = False
    vs_best: VsBest | None = None
    tie: bool = False  # not distinguishable from the best row at the report's alpha

    def by_seed(self, metric: str) -> dict[str, float]:
        """The completed seeds' finite values of ``metric``, by seed."""
        return {
            as_text(j.seed): float(j.metrics[metric]) for j in self.completed if is_finite_number(j.metrics.get(metric))
        }

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


def is_verification(metric: str) -> bool:
    """A verification set's accuracy (``lfw/acc``): the mean over its folds (marginlab/eval/verification.py)."""
    name, _, stat = metric.partition("/")
    return stat == "acc" and name not in ("test", "val", "train", "best", "step")


def default_metrics(jobs: list[Job]) -> list[str]:
    """With a validation split: best/val/acc (it picks the best row), then the test accuracy of best.pt and of the
    last epoch; without: test/acc. Runs scored by retrieval of unseen classes (no test/acc): MAP@R first, the
    val fold's when there is one, then P@1 (eval/retrieval_sets.py). Then every other ``<set>/acc`` the jobs
    measured (verification sets)."""
    keys = {k for j in jobs if j.status == "completed" for k, v in j.metrics.items() if is_finite_number(v)}
    extra = sorted(k for k in keys if is_verification(k))
    if "best/val/acc" in keys:
        first = ["best/val/acc", "best/test/acc", "test/acc"]
    elif "test/acc" not in keys and "best/val/map_at_r" in keys:
        first = ["best/val/map_at_r", "best/test/map_at_r", "best/test/precision_at_1", "test/map_at_r"]
    elif "test/acc" not in keys and "test/map_at_r" in keys:
        first = ["test/map_at_r", "test/precision_at_1", "test/r_precision"]
    else:
        first = ["test/acc"]
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
    keys: list[str]  # setting keys that differ between runs (the row labels; ``settings.compare``)
    common: dict[str, str]  # what every run has, with one value
    paper_labels: list[str]
    best_metric: str
    root: Path | None = None
    selected_on: str = ""  # the metric the runs chose best.pt on (``selection``)
    confounders: list[str] = field(default_factory=list)  # keys that differ but are not compared axes (mixed)
    confounder_values: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # key -> value -> run dirs
    alpha: float = 0.05  # the level of the tests against the best row; the intervals are 1 - alpha
    detect: float = 0.005  # the difference the seeds-needed hint is for

    @property
    def mixed(self) -> bool:
        return bool(self.confounders)

    @property
    def level(self) -> str:
        return f"{100 * (1 - self.alpha):.10g}%"

    # ------------------------------------------------------------ cells
    def label(self, metric: str) -> str:
        """The column header of ``metric``: its split and epoch (``column_label``)."""
        return column_label(metric, self.selected_on)

    @staticmethod
    def fmt(x: float | None, digits: int = 4) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{x:.{digits}f}"

    def stat_cell(self, stat: Summary | None, digits: int = 4) -> str:
        """mean ± the half-width of its confidence interval (one seed: the value alone)."""
        if stat is None:
            return "-"
        half = stat.half_width
        return self.fmt(stat.mean, digits) + (f" ± {self.fmt(half, digits)}" if half is not None else "")

    def key_label(self, key: str) -> str:
        """A column header: a confounder's is starred (the table is mixed)."""
        return f"{key}*" if key in self.confounders else key

    @property
    def tested(self) -> bool:
        return any(r.vs_best is not None and r.vs_best.p is not None for r in self.rows)

    def header(self) -> list[str]:
        keys = [self.key_label(k) for k in self.keys] or ["setting"]
        cols = ["best", *keys, "n", "failed", *map(self.label, self.metrics)]
        if self.tested:
            cols.append("p vs best")
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
            "best" if row.best else "†" if row.tie else "",
            *label,
            str(len(row.completed)),
            str(len(row.failed)),
            *[self.metric_cell(row, m, failed_text) for m in self.metrics],
        ]
        if self.tested:
            cells.append(self.p_cell(row))
        papers = {p.label: p for p in row.paper}
        for label_ in self.paper_labels:
            paper, ours = papers.get(label_), row.ours.get(label_)
            if paper is None:
                cells += ["", self.stat_cell(ours, 2) if ours else "", ""]
                continue
            diff = f"{ours.mean - paper.value:+.2f}" if ours else "-"
            cells += [f"{paper.value:g} [{paper.confidence}]", self.stat_cell(ours, 2) if ours else failed_text, diff]
        return cells

    @staticmethod
    def p_cell(row: Row) -> str:
        """The Holm-adjusted p against the best row; W: Welch's test (the seeds differ)."""
        vs = row.vs_best
        if vs is None or vs.p_holm is None:
            return "-"
        return f"{vs.p_holm:.3g}" + (" W" if vs.test == "Welch" else "")

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
        notes = self.mixed_notes()
        notes.append(
            f"n: seeds completed; each cell: mean ± half-width of its {self.level} confidence interval over the "
            f"seeds (Student t, n - 1 df; one seed: the value alone); std and interval ends in report.csv; "
            f"failed jobs are counted, not averaged. best: {direction} mean {self.label(self.best_metric)}."
        )
        notes += self.test_notes()
        notes += self.split_notes()
        if self.common:
            notes.append("common to every run: " + " ".join(f"{k}={v}" for k, v in self.common.items()))
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
            for job in row.jobs:
                notes += [
                    f"unreadable: {self.where(job)}/{problem}; its settings count as unknown"
                    for problem in job.unreadable
                ]
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

    def mixed_notes(self) -> list[str]:
        if not self.mixed:
            return []
        return [
            f"MIXED (--allow-mixed): the runs also differ in {', '.join(self.confounders)} (starred columns), "
            "which is not a compared axis: a row's difference is not only its setting's."
        ]

    def test_notes(self) -> list[str]:
        """How each row was tested against the best, what the mark means, how many seeds a difference needs."""
        notes = []
        tests = [r.vs_best for r in self.rows if r.vs_best is not None and r.vs_best.p is not None]
        if not tests and any(r.vs_best is not None for r in self.rows):
            notes.append("p vs best: no row and the best have 2 seeds each to test; †: not shown to differ.")
        if tests:
            kinds = {t.test for t in tests}
            how = []
            if "paired" in kinds:
                how.append("a paired t-test on the seeds both rows ran (same seed = same init and data order)")
            if "Welch" in kinds:
                how.append("Welch's t-test (unequal variances) where the rows ran different seeds, marked W")
            notes.append(
                f"p vs best: {self.best_metric}, two-sided, " + "; ".join(how) + f"; Holm-adjusted over "
                f"{len(tests)} comparison(s). †: not distinguishable from the best at "
                f"alpha = {self.alpha:g} (or fewer than 2 seeds to test)."
            )
            needed = [
                f"{self.row_name(r)}: {r.vs_best.seeds_needed or f'> {MAX_SEEDS}'}"
                for r in self.rows
                if r.vs_best is not None and r.vs_best.sd is not None
            ]
            if needed:
                notes.append(
                    f"seeds needed to detect a difference of {self.detect:g} in {self.best_metric} from the best row "
                    f"with 80% power (paired t-test, alpha = {self.alpha:g}, the observed std of per-seed "
                    f"differences): " + "; ".join(needed) + "."
                )
        folded = [m for m in self.metrics if is_verification(m)]
        if folded:
            notes.append(
                f"{', '.join(folded)}: per seed, the mean accuracy over its verification folds (as metrics.json "
                "holds it); the interval and tests are over seeds only: the folds share one trained model, they "
                "are not independent samples of the training randomness (the fold std is not pooled in)."
            )
        return notes

    def row_name(self, row: Row) -> str:
        """The row's own settings, ``key=value``; the keys it does not have ("-") left out."""
        return ", ".join(f"{k}={v}" for k in self.keys if (v := row.setting.get(k, "-")) != "-") or "(defaults)"

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
            header += [f"{m} mean", f"{m} std", f"{m} n", f"{m} ci_low", f"{m} ci_high"]
        header += ["test vs best", "p vs best", "p_holm", "seeds_needed"]
        for label in self.paper_labels:
            header += [
                f"paper {label}",
                f"paper {label} confidence",
                f"paper {label} source",
                f"ours {label} mean",
                f"ours {label} std",
                f"diff {label}",
            ]
        header += ["best", "not distinguishable from best", "mixed", "errors"]
        writer.writerow(header)
        num = lambda x: "" if x is None else repr(float(x))
        for row in self.rows:
            line = self.cells(row)[1 : 1 + len(keys)] + [len(row.completed), len(row.failed)]
            for m in self.metrics:
                stat = row.stats.get(m)
                line += [num(getattr(stat, name, None)) for name in ("mean", "std")]
                line += [stat.n if stat else 0, *(num(getattr(stat, name, None)) for name in ("ci_low", "ci_high"))]
            vs = row.vs_best
            line += [vs.test if vs else "", num(vs and vs.p), num(vs and vs.p_holm), (vs and vs.seeds_needed) or ""]
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
            mixed = " ".join(f"{k}={row.setting.get(k, '-')}" for k in self.confounders)
            line += [int(row.best), int(row.tie), mixed, " | ".join(str(j.error) for j in row.failed)]
            writer.writerow(line)
        return out.getvalue()

    def write(self, out_dir: Path) -> tuple[Path, Path, Path]:
        """report.md, report.csv and report.tex (a booktabs table for a paper) in ``out_dir``."""
        from marginlab.report.latex import latex

        out_dir.mkdir(parents=True, exist_ok=True)
        paths = out_dir / "report.md", out_dir / "report.csv", out_dir / "report.tex"
        for path, text in zip(paths, (self.markdown(), self.csv(), latex(self))):
            replace_text(path, text)
        return paths


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


def build_report(
    jobs: list[Job],
    metrics: list[str] | None = None,
    root: Path | None = None,
    axes: tuple[str, ...] | list[str] = (),
    alpha: float = 0.05,
    detect: float = 0.005,
) -> Report:
    """Groups ``jobs`` (in sweep order) by setting (``settings.compare``: every key that differs, confounders
    included), summarises each metric over the completed seeds and tests each row against the best."""
    comparison: Comparison = compare(jobs, [*axes, *(a for j in jobs for a in j.axes)])
    keys = comparison.columns
    rows: dict[tuple, Row] = {}
    for job in jobs:
        labels = {k: job.text(k) or "-" for k in keys}
        rows.setdefault(tuple(labels.values()), Row(setting={**job.setting(), **labels})).jobs.append(job)
    metrics = list(metrics or default_metrics(jobs))
    level = 1 - alpha
    for row in rows.values():
        for m in metrics:
            row.stats[m] = summarize(list(row.by_seed(m).values()), level)
        first = row.jobs[0]
        row.paper = paper_values(first.config.get("paper"), first.value)
        for p in row.paper:
            row.ours[p.label] = summarize([p.convert(v) for v in row.by_seed(p.measured).values()], level)
    paper_labels = list(dict.fromkeys(p.label for r in rows.values() for p in r.paper))
    best_metric = metrics[0] if metrics else "test/acc"
    scored = [r for r in rows.values() if r.stats.get(best_metric)]
    if scored:
        sign = -1.0 if lower_is_better(best_metric) else 1.0
        best = max(scored, key=lambda r: sign * r.stats[best_metric].mean)
        best.best = True
        compare_to_best(best, [r for r in scored if r is not best], best_metric, alpha, detect)
    return Report(
        rows=list(rows.values()),
        metrics=metrics,
        keys=keys,
        common=comparison.common,
        paper_labels=paper_labels,
        best_metric=best_metric,
        root=root,
        selected_on=selection(jobs),
        confounders=comparison.confounders,
        confounder_values=comparison.values,
        alpha=alpha,
        detect=detect,
    )


def compare_to_best(best: Row, rows: list[Row], metric: str, alpha: float, detect: float) -> None:
    """Each row against the best on ``metric`` (``stats.versus_best``); ``tie`` when not distinguishable."""
    results = versus_best(best.by_seed(metric), [r.by_seed(metric) for r in rows], alpha, detect)
    for row, result in zip(rows, results):
        row.vs_best = result
        row.tie = result.p_holm is None or result.p_holm >= alpha
