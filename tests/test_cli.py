"""The command line: help, override forms, shorthands, saved config, run directories."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from marginlab.commands.cli import main
from marginlab.help_catalog import CONFIGS, catalog

from .conftest import run_cli

FAST = ["logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false"]


def saved_config(run_dir):
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "examples" in out


def test_train_help_lists_groups_and_options():
    out = subprocess.run(
        [sys.executable, "-m", "marginlab", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for group in ("head:", "backbone:", "dataset:", "optim:", "sched:"):
        assert group in out.stdout
    for option in ("amsoftmax", "arcface", "softmax", "digits", "lenet_pp"):
        assert option in out.stdout
    # one line per head / backbone, from its module's docstring (marginlab.help_catalog)
    assert re.search(r"^  arcface +ArcFace \(Deng et al\., CVPR 2019\)$", out.stdout, re.MULTILINE)
    # options sharing one class: the line their own config file opens with
    assert re.search(
        r"^  iresnet50 +IResNet-50 \(InsightFace arcface_torch iresnet50\) \[depth=50\]$", out.stdout, re.M
    )


def hydra_help_page() -> str:
    """The page Hydra's own `marginlab train --help` prints (Hydra.app_help -> get_help), its group listing read from
    one config repository instead of a fresh one per group and option (the same repository each call builds)."""
    import copy

    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    import marginlab.commands.train  # noqa: F401  (schema, resolvers)

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        loader = hydra.config_loader
        _, repo = loader._parse_overrides_and_create_caching_repo(None, [])
        loader.get_group_options = lambda group_name, results_filter=ObjectType.CONFIG: repo.get_group_options(
            group_name, results_filter
        )
        cfg = compose("train", return_hydra_config=True)
        clean = hydra.get_sanitized_cfg(copy.deepcopy(cfg), "job")
        return hydra.get_help(cfg.hydra.help, clean, get_args_parser(), resolve=False)


def test_plain_train_help_is_hydras_page_without_hydras_listing():
    from marginlab.commands.help_page import train_help

    page = train_help(["--help"])
    assert page is not None  # the fast page, not a fall-back to Hydra
    assert page == hydra_help_page()  # every group, option, catalog line and default value Hydra would print
    assert train_help(["-h"]) == page
    assert train_help(["--help", "head=arcface"]) is None  # overrides: Hydra composes the page itself


def test_train_help_falls_back_to_hydra_on_configs_it_does_not_read(tmp_path, monkeypatch):
    import shutil

    from marginlab.commands import help_page

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    monkeypatch.setattr(help_page, "CONFIGS", configs)
    assert help_page.train_help(["--help"]) is not None
    head = configs / "head" / "amsoftmax.yaml"
    head.write_text("# @package _global_\n" + head.read_text())  # Hydra would place it elsewhere
    assert help_page.train_help(["--help"]) is None


def test_help_catalog_has_a_line_for_every_head_and_backbone():
    for group in ("head", "backbone"):
        options = {p.stem for p in (CONFIGS / group).glob("*.yaml")}
        lines = dict(catalog(group))
        assert set(lines) == options
        assert all(lines.values()), [o for o, line in lines.items() if not line]
    heads = dict(catalog("head"))
    assert heads["sphereface"] == "SphereFace / A-Softmax (Liu et al., CVPR 2017)"
    # same class as normface: its own file's opening line, and the values that tell them apart
    assert heads["cosine"].startswith("Cosine Normalization") and heads["cosine"].endswith("[s=1.0]")


def test_every_config_option_a_help_text_names_exists(capsys):
    """``align --help`` recommended ``dataset=imagefolder``, which is no config: every ``<group>=<option>`` of the
    top-level and command help pages must name a ``configs/<group>/<option>.yaml``."""
    from marginlab.commands.cli import COMMANDS

    groups = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    pages = {}
    for command in ["", *COMMANDS]:
        assert run_cli(*([command, "--help"] if command else ["--help"])) == 0
        pages[f"marginlab {command} --help".replace("  ", " ")] = capsys.readouterr().out
    named = [
        (page, group, option)
        for page, text in pages.items()
        for group, options in re.findall(rf"(?<![.\w])({'|'.join(groups)})=([\w,]+)", text)
        for option in options.split(",")
    ]
    assert {group for _, group, _ in named} >= {"dataset", "head", "backbone"}  # the pages were read
    missing = [
        f"{page}: {group}={option}"
        for page, group, option in named
        if not (CONFIGS / group).joinpath(f"{option}.yaml").is_file()
    ]
    assert missing == []


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


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("marginlab: error: "), err
    return lines[0]


def test_misspelled_key_suggests_the_close_one_and_lists_the_keys(run_train, capfd):
    code, _ = run_train("trainer.epoch=1", *FAST)
    line = one_error_line(capfd.readouterr().err)
    assert code == 2
    assert "unknown key 'trainer.epoch'" in line and "did you mean 'trainer.epochs'?" in line
    assert "keys of trainer: epochs, " in line and "+trainer.epoch" not in line  # not Hydra's advice to append it


def test_an_added_key_nothing_reads_is_refused_not_ignored(run_train, capfd):
    # `+trainer.epoch=1` passes Hydra (it appends the key) and used to start a run of the default epochs
    code, run_dir = run_train("+trainer.epoch=1", *FAST)
    err = capfd.readouterr().err
    assert code == 2 and "unknown key 'trainer.epoch'" in err and "did you mean 'trainer.epochs'?" in err
    assert not (run_dir / "metrics.jsonl").exists()  # nothing trained
    code, _ = run_train("+logger.foo=1", *FAST)
    assert code == 2 and "unknown key 'logger.foo': nothing reads it; keys of logger:" in capfd.readouterr().err


def test_misspelled_group_and_option_suggest_the_close_one(run_train, capfd):
    code, _ = run_train("haed=arcface", *FAST)
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and "did you mean 'head'?" in line and "config groups: " in line
    code, _ = run_train("head=arcfac", *FAST)
    err = capfd.readouterr().err
    assert code == 2 and "Could not find 'head/arcfac'; did you mean 'head=arcface'?" in err.splitlines()[0]


def test_help_catalog_reads_the_same_docstring_as_ast():
    import ast

    from marginlab.help_catalog import PACKAGE, module_docstring

    for path in sorted((PACKAGE / "heads").glob("*.py")) + sorted((PACKAGE / "backbones").glob("*.py")):
        assert module_docstring(path) == (ast.get_docstring(ast.parse(path.read_text())) or ""), path


def test_misspelled_key_in_a_sweep_suggests_the_close_one(run_train, capfd):
    code, _ = run_train("-m", "trainer.epoch=1,2", *FAST)
    err = capfd.readouterr().err
    assert code == 2 and "did you mean 'trainer.epochs'? keys of trainer: epochs, " in err and "[2 of 2 jobs]" in err


def test_a_run_that_never_trained_says_where_its_failure_record_is(run_train, capfd):
    code, run_dir = run_train("optim.lr=abc", *FAST)
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and "optim.lr='abc'" in line
    assert f"(the run never trained: {run_dir} holds only its config and this failure, in metrics.json)" in line
    assert not (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.json").exists()


def test_options_sharing_a_class_are_described_by_their_own_file():
    from marginlab.help_catalog import catalog

    lines = dict(catalog("backbone"))
    assert lines["normface_lenet"].startswith("NormFace's MNIST net") and "VGG" not in lines["normface_lenet"]
    assert lines["lsoftmax_cifar10"].startswith("L-Softmax paper's CIFAR-10 net")
    assert lines["resnet18"].endswith("[arch=resnet18]")
