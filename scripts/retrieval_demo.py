"""Regenerates the worked example of docs/metric-learning.md (retrieval of unseen digits) from a real run.

    python scripts/retrieval_demo.py                 # runs `marginlab reproduce digits_retrieval` (about a minute)
    python scripts/retrieval_demo.py --sweep DIR     # reuses a finished sweep directory of that experiment

It writes the report's table between the ``<!-- digits_retrieval:start -->`` / ``<!-- digits_retrieval:end -->``
markers of ``docs/metric-learning.md``, with the machine, date, commit, torch version and threads the runs
recorded (their metrics.json ``environment``). Nothing in that block is typed by hand."""

from __future__ import annotations

import argparse
from pathlib import Path

from readme_results import ROOT, marginlab, newest_sweep, provenance, replace_block, table_of

PAGE = ROOT / "docs" / "metric-learning.md"
START, END = "<!-- digits_retrieval:start -->", "<!-- digits_retrieval:end -->"
EXPERIMENT = "digits_retrieval"


def block(table: str, provenance: str) -> str:
    return f"{START}\n{provenance}\n\n{table}\n\n{END}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, help=f"a finished {EXPERIMENT} sweep directory to reuse")
    opts = parser.parse_args()
    if opts.sweep is None:
        marginlab("reproduce", EXPERIMENT)  # ends with `marginlab report` (report.md)
    sweep = opts.sweep or newest_sweep(EXPERIMENT)
    if opts.sweep is not None:
        marginlab("report", str(sweep))
    table = table_of((sweep / "report.md").read_text())
    line = provenance("retrieval_demo.py", EXPERIMENT, sweep)
    PAGE.write_text(replace_block(PAGE.read_text(), block(table, line), START, END, PAGE))
    print(f"{PAGE} block written from {sweep}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
