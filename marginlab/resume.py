"""``resume=<run dir | checkpoint | latest>``: rerun Hydra with the run's own overrides, in the run's own directory."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from marginlab.checkpoint import find_run_dir, resume_checkpoint


def outputs_root() -> Path:
    return Path(os.environ.get("MARGINLAB_OUTPUT_DIR", "outputs"))


#: per-invocation settings that a resumed run does not inherit from the original command line
NOT_INHERITED = ("resume", "trainer.stop_after_epoch")


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_resume(overrides: list[str]) -> list[str]:
    """Replaces ``resume=X`` by the original run's overrides + the new ones (later wins) + its run dir."""
    given = [o for o in overrides if override_key(o) == "resume"]
    if not given:
        return overrides
    value = given[-1].split("=", 1)[1]
    if value in ("", "null"):
        return [o for o in overrides if override_key(o) != "resume"]
    run_dir = find_run_dir(value, outputs_root())
    ckpt = resume_checkpoint(value, run_dir)
    original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    merged: dict[str, str] = {}
    for o in [o for o in original if override_key(o) not in NOT_INHERITED] + overrides:
        if override_key(o) != "resume":
            merged[override_key(o)] = o
    return list(merged.values()) + [f"resume={ckpt}", f"hydra.run.dir={run_dir}"]
