"""Where a run's numbers came from (issue #23): the torch thread count a run sets from trainer.num_threads and
records, and metrics.json's ``environment`` (exactly the keys report code reads), its git commit cheap and
never failing outside a checkout."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

import marginlab
from marginlab.environment import environment, git_commit, kept_threads, use_threads

KEYS = {"torch_threads", "torch", "cuda", "device", "marginlab", "git_commit"}
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_the_environment_has_exactly_the_keys_report_code_reads():
    env = environment(torch.device("cpu"))
    assert set(env) == KEYS
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert env["torch"] == torch.__version__ and env["marginlab"] == marginlab.__version__
    assert env["cuda"] == (torch.version.cuda or None)


def test_a_cuda_device_is_named_with_its_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"NVIDIA H100 #{torch.device(device).index}")
    assert environment(torch.device("cuda", 1))["device"] == "cuda:1 (NVIDIA H100 #1)"


def test_use_threads_sets_the_count_and_kept_threads_restores_it():
    before = torch.get_num_threads()
    with kept_threads():
        assert use_threads(None) == before  # null: torch's own count
        assert use_threads(1) == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) is None


def fake_checkout(root, head: str, ref_file: str | None = None, packed: bool = False):
    git = root / "gitdir"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    if ref_file:
        (git / ref_file).write_text(SHA + "\n")
    if packed:
        (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{SHA} refs/heads/main\n")
    (root / ".git").write_text(f"gitdir: {git}\n")  # as a worktree's .git file
    return root


@pytest.mark.parametrize(
    "head, ref_file, packed",
    [("ref: refs/heads/main", "refs/heads/main", False), ("ref: refs/heads/main", None, True), (SHA, None, False)],
    ids=["loose-ref", "packed-ref", "detached"],
)
def test_without_a_git_binary_the_commit_is_read_from_the_git_files(tmp_path, monkeypatch, head, ref_file, packed):
    root = fake_checkout(tmp_path, head, ref_file, packed)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # `git` is not found: the files are read
    assert git_commit(root) == "0123456 (unchecked)"


def test_a_checkout_is_marked_clean_or_dirty(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no working git here")
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True, timeout=30)
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == f"{sha} (clean)"
    (tmp_path / "a.txt").write_text("b")
    git_commit.cache_clear()  # cached per process: the code a process runs is the code it imported
    assert git_commit(tmp_path) == f"{sha} (dirty)"


def test_a_run_sets_and_records_its_thread_count_then_restores_the_process_count(run_train, metrics):
    """metrics.json's environment and the first epoch record of the run say what it ran with; the saved config
    holds the count in use (null: torch's count); the process's count is back after the run."""
    before = torch.get_num_threads()
    with kept_threads():
        torch.set_num_threads(2)
        code, run_dir = run_train("logger=quiet", "trainer.epochs=2", "trainer.num_threads=1")
        assert code == 0 and torch.get_num_threads() == 2
        summary, records = metrics[0](run_dir), metrics[1](run_dir)
        assert set(summary["environment"]) == KEYS and summary["environment"]["torch_threads"] == 1
        assert records[0]["environment"] == summary["environment"] and "environment" not in records[1]
        assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["num_threads"] == 1
        code, run_dir = run_train("logger=quiet", "trainer.epochs=1")  # null: the count torch has
        assert code == 0 and metrics[0](run_dir)["environment"]["torch_threads"] == 2
        assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["num_threads"] == 2
    assert torch.get_num_threads() == before


def test_a_thread_count_below_one_is_refused_in_one_line(run_train, capfd):
    code, _ = run_train("logger=quiet", "trainer.num_threads=0")
    err = capfd.readouterr().err
    assert code == 2 and "trainer.num_threads=0 is not allowed: it must be an integer >= 1 (or null)" in err
    assert "Traceback" not in err
