"""What the runs of one table have in common and where they differ: the compared axes (the row labels), the
confounders (a difference the table would otherwise pass off as the heads'), and the settings common to every run.

A key is read per run by ``Job.text``: its saved config first (the value it ran with), else its override; a run
without the key has it unknown. Keys:

- axes: the head and its parameters, the regularizer, anything else that is not a confounder, and every key
  named by ``--axis`` (or a sweeper's search space): a column when two runs that have it differ, or when it is
  missing in some runs and was set on a command line; ``head.s`` / ``head.m`` (the effective scale and margin,
  default or not) whenever they are not common to every run.
- confounders (``CONFOUNDERS``): training length, optimiser, schedule, data, backbone, precision, threads,
  versions. A difference between runs that have the key makes the table mixed: refused unless ``--allow-mixed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marginlab.report.jobs import Job, as_text, is_noise

#: keys (a key, or a prefix followed by ".") that change the result but are not what a margin table compares
CONFOUNDERS = (
    "trainer",
    "optim",
    "sched",
    "dataset",
    "backbone",
    "init_from_head",
    "environment.torch_threads",
    "environment.marginlab",
    "environment.torch",
)
#: the environment record's entries read at all (its other entries: cuda, device, git_commit, are not compared)
ENVIRONMENT_KEYS = ("environment.torch_threads", "environment.marginlab", "environment.torch")
#: the top-level shorthands and the head parameters they set (the saved config records the effective value)
SHORTHANDS = {"m": "head.m", "s": "head.s"}
#: shown whenever they are not common to every run: "ArcFace s=64 m=0.5" even when those are its defaults
HEADLINE = ("head.s", "head.m")
#: listed on the "common to every run" line when every run has the same value (beside the common overrides)
COMMON_KEYS = ("experiment", "dataset", "backbone", "head.s", "head.m", "trainer.epochs", "optim", "optim.lr")


def covered(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_confounder(key: str, axes: tuple[str, ...] | list[str] = ()) -> bool:
    """A key whose difference between runs confounds the comparison, unless it is a declared axis."""
    return covered(key, CONFOUNDERS) and not covered(key, axes) and not is_noise(key)


def override_keys(job: Job) -> list[str]:
    return [SHORTHANDS.get(k, k) for k in job.setting()]


def candidate_keys(jobs: list[Job]) -> list[str]:
    """Every key of every run that can tell settings apart: choices first, then overrides and config values
    (seed, run management and ``_target_`` aside); the environment's compared entries last."""
    keys = dict.fromkeys(
        [
            *(k for j in jobs for k in j.group_keys()),
            *HEADLINE,
            *(k for j in jobs for k in override_keys(j)),
            *(k for j in jobs for k in j.config_keys()),
            *(k for k in ENVIRONMENT_KEYS if any(j.text(k) is not None for j in jobs)),
        ]
    )
    return [k for k in keys if k not in SHORTHANDS and not is_noise(k)]


@dataclass
class Comparison:
    columns: list[str]  # the keys that label rows (axes that differ; confounders too when mixed)
    confounders: list[str]  # confounders whose value differs between runs that have them
    common: dict[str, str]  # what every run has, with one value
    values: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # confounder -> value -> run dirs

    @property
    def mixed(self) -> bool:
        return bool(self.confounders)


def is_common(key: str, texts: list[str | None], overridden: set[str]) -> bool:
    """Worth the common line: every run has it with one value, and a run set it, or it is a headline (not null)."""
    return None not in texts and (key in overridden or (key in COMMON_KEYS and texts[0] != "null"))


def compare(jobs: list[Job], axes: tuple[str, ...] | list[str] = ()) -> Comparison:
    """Sorts every candidate key of ``jobs`` into a column, a confounder, common or neither."""
    overridden = {k for j in jobs for k in override_keys(j)}
    columns, confounders, common, values = [], [], {}, {}
    for key in candidate_keys(jobs):
        texts = [j.text(key) for j in jobs]
        known = {t for t in texts if t is not None}
        if not known or all(t == as_text(j.seed) for t, j in zip(texts, jobs)):
            continue  # nobody has it, or the seed under another name (dataset.seed: ${seed}): averaged over
        if is_confounder(key, axes):
            if len(known) > 1:
                confounders.append(key)
                values[key] = {v: [str(j.path) for j, t in zip(jobs, texts) if t == v] for v in sorted(known)}
            elif is_common(key, texts, overridden):
                common[key] = known.pop()
            continue
        if len(known) > 1 or (None in texts and (key in HEADLINE or key in overridden)):
            columns.append(key)
        elif is_common(key, texts, overridden):
            common[key] = known.pop()
    return Comparison(columns + confounders, confounders, common, values)
