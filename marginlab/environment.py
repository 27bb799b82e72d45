"""Where a run's numbers came from: the torch thread count it trains with (``trainer.num_threads``) and the
``"environment"`` dict of metrics.json (torch, CUDA, device, marginlab version, git commit).

Float results depend on the thread count (a reduction split over more threads adds in another order), so a run
sets it from its config, whichever command started it, and records the count it used.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from pathlib import Path

import torch

import marginlab

#: the checkout marginlab runs from, when it runs from one (an installed package has no .git beside it)
SOURCE_ROOT = Path(marginlab.__file__).resolve().parent.parent
GIT_TIMEOUT_S = 2.0


def use_threads(n: int | None) -> int:
    """``torch.set_num_threads(n)`` (``None``: torch's count as it is); the count in use."""
    if n is not None:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


@contextlib.contextmanager
def kept_threads():
    """The block may set torch's thread count (a run: ``use_threads``); after it the count is what it was."""
    saved = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says: for benchmark and table footers."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """metrics.json's ``"environment"``: what else decides the run's float results besides its config."""
    name = f"{device.type}:{device.index or 0}" if device.type == "cuda" else str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or None,
        "device": name,
        "marginlab": marginlab.__version__,
        "git_commit": git_commit(),
    }


@functools.cache
def git_commit(root: Path = SOURCE_ROOT) -> str | None:
    """``<short sha> (clean)`` / ``(dirty)`` of the checkout at ``root``, ``(unchecked)`` without a working git;
    None outside a checkout. Cached: the code a process runs is the code it imported."""
    if not (root / ".git").exists():
        return None
    try:
        sha, status = (
            subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
            ).stdout.strip()
            for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.SubprocessError):  # no git binary, a slow disk, not a repository after all
        sha = head_sha(root)
        return f"{sha[:7]} (unchecked)" if sha else None
    return f"{sha} ({'dirty' if status else 'clean'})"


def head_sha(root: Path) -> str | None:
    """The commit ``root/.git`` points at, read from its files (a worktree's ``.git`` file, packed refs)."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None  # a detached HEAD holds the sha itself
        ref = head.split(":", 1)[1].strip()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        lines = packed.read_text().splitlines() if packed.is_file() else []
        return next((line.split()[0] for line in lines if line.endswith(f" {ref}")), None)
    except (OSError, IndexError):
        return None
