"""trainer.device is an enum (auto | cpu | cuda) and trainer.device_index picks the GPU (issue #26)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from marginlab.distributed.runtime import DistContext
from marginlab.errors import ConfigError
from marginlab.training import train
from marginlab.training.resume import merge_overrides, previous_overrides, upgraded_overrides

from .conftest import run_cli


@pytest.mark.parametrize("value", ["gpu", "cuda:1", "CPU"])
def test_a_bad_device_is_refused_as_the_config_composes(outputs_dir, capfd, value):
    """--cfg job refuses it as it does a bad precision: before any run directory exists."""
    code = run_cli("train", "--cfg", "job", f"trainer.device={value}")
    err = capfd.readouterr().err
    assert code == 2 and "expected one of [auto, cpu, cuda]" in err and err.count("\n") == 1, err
    assert not (outputs_dir / "runs").exists()


def test_the_cfg_job_page_shows_the_kind_and_the_index(capfd):
    assert run_cli("train", "--cfg", "job", "trainer.device=cpu") == 0
    out = capfd.readouterr().out
    assert "  device: cpu\n" in out and "  device_index: null\n" in out


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_the_index_picks_the_gpu_and_one_past_the_last_is_refused(monkeypatch):
    from marginlab.device import training_device

    fake_gpus(monkeypatch, 2)
    assert training_device("cuda", 1) == torch.device("cuda", 1)
    assert training_device("cuda", None) == torch.device("cuda")
    refusal = r"^trainer.device_index=2 is not allowed: this machine has 2 GPU\(s\), so choose 0 to 1, or leave"
    with pytest.raises(ConfigError, match=refusal):
        training_device("cuda", 2)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "CUDA", ""])
def test_eval_and_embed_refuse_a_device_torch_would_fail_on(name):
    """The plain-string device= of eval and embed: one line naming the key, not torch's RuntimeError."""
    from marginlab.device import resolve_device

    with pytest.raises(ConfigError, match=rf"^device='{name}' is not allowed: choose auto, cpu, cuda or cuda:N$"):
        resolve_device(name)


def test_eval_and_embed_check_the_gpu_index_too(monkeypatch):
    from marginlab.device import resolve_device

    fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^device='cuda:1' is not allowed: this machine has 1 GPU\(s\), so choose 0"):
        resolve_device("cuda:1")


def test_without_cuda_the_index_is_never_reached(monkeypatch):
    from marginlab.device import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device='cuda' but CUDA is not available here"):
        training_device("cuda", 0)
    assert training_device("cpu", None) == torch.device("cpu")


def test_torchrun_refuses_an_index_it_would_ignore(monkeypatch, tmp_path):
    """Each torchrun process takes the GPU of its LOCAL_RANK: an index would be silently dropped."""
    monkeypatch.setattr(train, "training_device", lambda kind, index: torch.device("cuda", index))
    monkeypatch.setattr(DistContext, "from_env", classmethod(lambda cls, device_type: cls(0, 2, 0)))
    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["trainer.device=cuda", "trainer.device_index=1"])
    with pytest.raises(ConfigError, match=r"device_index=1 is not allowed under torchrun.*CUDA_VISIBLE_DEVICES"):
        train.set_up_run(cfg, tmp_path)


def test_an_old_runs_cuda_n_is_replayed_as_the_kind_and_the_index(tmp_path):
    """A run saved before the enum holds `trainer.device=cuda:N` in its overrides: a resume reads it in today's
    spelling, which composes."""
    assert upgraded_overrides(["seed=1", "trainer.device=cuda:3", "++trainer.device=cuda:0", "trainer.device=cpu"]) == [
        "seed=1",
        "trainer.device=cuda",
        "trainer.device_index=3",
        "++trainer.device=cuda",
        "trainer.device_index=0",
        "trainer.device=cpu",
    ]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- head=arcface\n- trainer.device=cuda:1\n")
    replayed = previous_overrides(tmp_path)
    assert replayed == ["head=arcface", "trainer.device=cuda", "trainer.device_index=1"]
    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("train", overrides=replayed)
    assert cfg.trainer.device == "cuda" and cfg.trainer.device_index == 1


def test_a_resume_that_names_a_device_drops_the_runs_gpu_index():
    """`resume=X trainer.device=cpu` for a run on GPU 1 goes on on the CPU, not refused for the old index."""
    run = ["head=arcface", "trainer.device=cuda", "trainer.device_index=1"]
    assert merge_overrides(run, ["trainer.device=cpu"]) == ["head=arcface", "trainer.device=cpu"]
    assert merge_overrides(run, ["trainer.device_index=0"]) == [*run[:2], "trainer.device_index=0"]
    assert merge_overrides(run, ["trainer.epochs=5"]) == [*run, "trainer.epochs=5"]
