"""``report.tex``: the report as a booktabs table for a paper. A row per setting labelled in words ("ArcFace
($s$=10, $m$=0.2)"), mean $\\pm$ the confidence interval's half-width per metric, the best row in bold, a dagger on
the rows not distinguishable from it, the report's notes below. Every text from a run directory is escaped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from marginlab.head_names import HEADS, REGULARIZERS

if TYPE_CHECKING:
    from marginlab.report.table import Report, Row

#: head parameters written as math symbols in a row label
SYMBOLS = {"head.s": "$s$", "head.m": "$m$"}
_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",  # OT1 prints < and > as inverted ! and ?
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "±": r"$\pm$",
    "†": r"$^\dagger$",
    "[": "{[}",  # a row starting with [ would be read as the optional argument of the \\ before it
    "]": "{]}",
}


def escape(text: object) -> str:
    """``text`` as LaTeX prints it literally (the ten special characters, < > | and brackets, ± / † as math)."""
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def row_label(report: Report, row: Row) -> str:
    """ "ArcFace ($s$=10, $m$=0.2)", then the row's other columns as key=value; "(defaults)" for none."""
    setting = {k: row.setting.get(k, "-") for k in report.keys}
    head = setting.pop("head", None) or (row.jobs[0].text("head") if row.jobs else None)
    name = escape(HEADS.get(head, head)) if head and head not in ("-", "null") else ""
    regularizer = setting.pop("regularizer", None)
    if regularizer and regularizer not in ("-", "null"):
        name += (" + " if name else "") + escape(REGULARIZERS.get(regularizer, regularizer))
    shown = [k for k in SYMBOLS if k in setting] + [k for k in setting if k not in SYMBOLS]
    params = [
        f"{SYMBOLS.get(k) or escape(report.key_label(k))}={escape(setting[k])}" for k in shown if setting[k] != "-"
    ]
    if not params:
        return name or "(defaults)"
    return f"{name} ({', '.join(params)})" if name else ", ".join(params)


def cell(report: Report, row: Row, metric: str) -> str:
    stat = row.stats.get(metric)
    if stat is None:
        return "--"
    half = stat.half_width
    text = f"{stat.mean:.4f}" + (rf" \pm {half:.4f}" if half is not None else "")
    if row.best and metric == report.best_metric:
        text = rf"\mathbf{{{text}}}"
    mark = r"^\dagger" if row.tie and metric == report.best_metric else ""
    return f"${text}{mark}$"


def latex(report: Report) -> str:
    header = ["Setting", "$n$", *(escape(report.label(m)) for m in report.metrics)]
    lines = [
        "% marginlab report: needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        "\\toprule",
        " & ".join(header) + r" \\",
        "\\midrule",
    ]
    for row in report.rows:
        cells = [row_label(report, row), str(len(row.completed)), *(cell(report, row, m) for m in report.metrics)]
        lines.append(" & ".join(cells) + r" \\")
    caption = "Mixed settings: " if report.mixed else ""
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        "\\par\\smallskip",
        "\\begin{minipage}{\\linewidth}\\footnotesize",
        *(f"{escape(note)}\\par" for note in report.notes()),
        "\\end{minipage}",
        f"\\caption{{{caption}{escape(report.best_metric)}, mean $\\pm$ {escape(report.level)} confidence "
        f"interval over seeds; bold: best; $^\\dagger$: not distinguishable from the best.}}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"
