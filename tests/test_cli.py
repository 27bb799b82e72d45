"""The command line: help, override forms, shorthands, saved config, run directories."""

from __future__ import annotations

import subprocess
import sys

import yaml

from marginlab.cli import main

FAST = ["logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false"]


def saved_config(run_dir):
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "examples" in out


def test_train_help_lists_groups_and_options():
    out = subprocess.run([sys.executable, "-m", "marginlab", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for group in ("head:", "backbone:", "dataset:", "optim:", "sched:"):
        assert group in out.stdout
    for option in ("amsoftmax", "arcface", "softmax", "digits", "lenet_pp"):
        assert option in out.stdout


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_shorthand_m_s_reach_the_head_and_the_saved_config(run_train):
    code, run_dir = run_train("head=amsoftmax", "m=0.2", "s=10", *FAST)
    assert code == 0
    head = saved_config(run_dir)["head"]
    assert head["m"] == 0.2 and head["s"] == 10
    assert run_dir.name.endswith("_amsoftmax_digits")


def test_dotted_head_override_and_head_default(run_train):
    _, run_dir = run_train("head=amsoftmax", "head.m=0.25", *FAST)
    assert saved_config(run_dir)["head"]["m"] == 0.25
    _, run_dir = run_train("head=arcface", *FAST)
    head = saved_config(run_dir)["head"]
    assert head["m"] == 0.5 and head["s"] == 64.0  # the head config's own defaults


def test_cosface_is_amsoftmax_under_its_other_name(run_train):
    _, run_dir = run_train("head=cosface", "m=0.3", *FAST)
    assert saved_config(run_dir)["head"]["_target_"].endswith("AMSoftmaxHead")


def test_run_name_goes_into_the_directory(run_train):
    _, run_dir = run_train("name=trial", *FAST)
    assert run_dir.name.endswith("_trial")
