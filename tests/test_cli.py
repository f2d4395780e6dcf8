"""The command lines a newcomer meets first: --help of every command shows every option with its
default and no markup; failures are one line without a traceback (unless --log-level debug);
and the Makefile installs PyTorch from PyPI unless TORCH= names PyTorch's own index."""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cryolens import cli
from cryolens.checkpoints import REGISTRY
from cryolens.server import minimal_cryolens_server as server_cli
from cryolens.server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "evaluate", "info"]


def subparser(name: str) -> argparse.ArgumentParser:
    if name == "train":  # built only for `cryolens train` (its defaults come with PyTorch)
        from cryolens.commands.train import build_parser

        return build_parser(cli._common_options())
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        (server_cli.main if argv[:1] == ["server"] else cli.main)(argv[1:] if argv[:1] == ["server"]
                                                                  else argv)
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS), ["serve"], ["server"]],
                         ids=["cryolens", *COMMANDS, "serve", "cryolens-server"])
def test_help_has_no_markup_and_a_default_for_every_option(argv, capsys):
    text = help_text([*argv, "--help"], capsys)
    for markup in ("``", ":class:", ":func:", ":meth:", ".. "):
        assert markup not in text, text
    if argv in ([], ["server"]):
        return
    parser = (server_cli.build_parser(Settings()) if argv[0] in ("serve", "server")
              else subparser(argv[0]))
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings or action.dest
        assert action.help, f"{name} has no help"
        if isinstance(action, argparse._StoreTrueAction):
            continue
        if action.default is None:  # then the help says in words what happens by default
            assert "(default: " in action.help, name
        else:
            assert "(default: %(default)s)" in formatter._get_help_string(action), name

def test_cryolens_serve_help_names_its_own_command(capsys):
    text = help_text(["serve", "--help"], capsys)
    assert text.startswith("usage: cryolens serve ")
    assert "--checkpoint CHECKPOINT, -c CHECKPOINT" in text and "(default: demo)" in text


def test_every_settings_field_has_a_flag_an_env_variable_and_help(capsys):
    text = " ".join(help_text(["server", "--help"], capsys).split())
    parser = server_cli.build_parser(Settings())
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for field in dataclasses.fields(Settings):
        assert f"--{field.name.replace('_', '-')}" in flags
        assert field.metadata["help"].split()[0] in text
    for seed_flag in ("--checkpoint", "-c", "--host", "--port", "-p", "--cors", "--device",
                      "--reload", "--log-level", "--workers", "--max-body-bytes", "--max-volumes",
                      "--queue-size", "--list-versions"):
        assert seed_flag in flags


@pytest.mark.parametrize("device, expected", [
    ("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("Cuda:03", "cuda:3"),
])
def test_devices_accepted(device, expected):
    assert Settings(device=device).device == expected
    assert Settings.from_env({"CRYOLENS_DEVICE": device}).device == expected


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "cuda1", "cpu:0"])
def test_devices_refused(device, capsys):
    with pytest.raises(ValueError, match="device must be one of"):
        Settings(device=device)
    with pytest.raises(SystemExit) as done:
        server_cli.main(["--device", device])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_lazy_app_is_built_once_from_the_environment(monkeypatch):
    import importlib

    module = importlib.reload(server_cli)
    assert "app" not in vars(module)  # importing builds nothing
    monkeypatch.setenv("CRYOLENS_MAX_VOLUMES", "7")
    app = module.app
    assert module.app is app and vars(module)["app"] is app
    with pytest.raises(AttributeError):
        module.not_there  # noqa: B018


def test_missing_checkpoint_is_one_line(capsys):
    assert cli.main(["info", "/nonexistent/model.ckpt"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cryolens: Checkpoint '/nonexistent/model.ckpt' does not exist")
    assert captured.err.count("\n") == 1


def test_debug_log_level_shows_the_traceback():
    from cryolens.errors import CheckpointError

    with pytest.raises(CheckpointError):
        cli.main(["info", "/nonexistent/model.ckpt", "--log-level", "debug"])


def test_offline_v001_is_one_line_with_advice(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nobody listens on: the download fails at once
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/cryolens_v001.pt"
    monkeypatch.setitem(REGISTRY, "v001", dataclasses.replace(REGISTRY["v001"], url=url))
    monkeypatch.setenv("CRYOLENS_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["info", "v001"]) == 1
    err = capsys.readouterr().err
    # pooch may say "Downloading data from ..." first: progress, not part of the error
    errors = [line for line in err.splitlines() if not line.startswith("Downloading data from")]
    assert len(errors) == 1 and errors[0].startswith("cryolens: Could not download")
    assert "--checkpoint demo" in err and "Traceback" not in err


def test_unexpected_error_names_its_type_and_how_to_see_more(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something odd\nsecond line")

    from cryolens.commands import info

    monkeypatch.setattr(info, "run", broken)
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err == ("cryolens: RuntimeError: something odd (run again with "
                                       "--log-level debug for the traceback)\n")


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["evaluate", "--per-structure", "many"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cryolens evaluate: error: argument")


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_console_entry_points_run_as_modules():
    done = subprocess.run([sys.executable, "-m", "cryolens.cli", "info"], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("v001")


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_dry_run(*variables: str, target: str = "install") -> str:
    """What ``make`` would run for a fresh virtual environment: printed (-n), never run."""
    done = subprocess.run(["make", "--no-print-directory", "-n", "-C", str(REPO), target,
                           "VENV=/nonexistent/venv", "PYTEST_ARGS=", *variables],
                          check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


@needs_make
def test_default_install_uses_only_pypi():
    commands = make_dry_run()
    torch_line = next(line for line in commands.splitlines() if '"torch==' in line)
    assert torch_line.split() == ["/nonexistent/venv/bin/python", "-m", "pip", "install",
                                  "--progress-bar", "on", '"torch==2.13.0"']
    assert "download.pytorch.org" not in commands and "--index-url" not in commands
    assert " -q" not in commands  # pip's progress stays visible


@needs_make
@pytest.mark.parametrize("torch_index", ["cpu", "cu128"])
def test_torch_switch_uses_pytorchs_index(torch_index):
    commands = make_dry_run(f"TORCH={torch_index}")
    torch_line = next(line for line in commands.splitlines() if '"torch==' in line)
    assert torch_line.endswith(f"--index-url https://download.pytorch.org/whl/{torch_index}")
    # only PyTorch comes from there; the package and its test tools still come from PyPI
    package_line = next(line for line in commands.splitlines() if "-e '.[dev" in line)
    assert "--index-url" not in package_line


@needs_make
def test_make_serve_passes_its_variables():
    commands = make_dry_run("CHECKPOINT=/models/my model.ckpt", "PORT=8080", "DEVICE=cuda:1",
                            target="serve")
    assert commands.splitlines()[-1].endswith(
        '-m cryolens.server.minimal_cryolens_server --checkpoint "/models/my model.ckpt" '
        "--port 8080 --device cuda:1 --host 127.0.0.1")


@needs_make
def test_make_test_quick_skips_slow_tests_and_tests_run_on_two_workers():
    quick = make_dry_run(target="test-quick").splitlines()[-1]
    assert quick.endswith('-m pytest -n 2 --dist loadfile -m "not slow" ')
    assert make_dry_run(target="test").splitlines()[-1].endswith("-m pytest -n 2 --dist loadfile ")
    one = make_dry_run("WORKERS=0", target="test").splitlines()[-1]
    assert one.endswith("-m pytest -n 0 --dist loadfile ")  # one process, as plain pytest


def test_version(capsys):
    from cryolens import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"cryolens {__version__}\n"


@pytest.mark.parametrize("argv, option", [
    (["train", "--batch-size", "0"], "--batch-size"), (["train", "--steps", "-1"], "--steps"),
    (["train", "--lr", "0"], "--lr"), (["train", "--threads", "0"], "--threads"),
    (["embed", "x", "-o", "x.parquet", "--voxel-spacing", "nan"], "--voxel-spacing"),
])
def test_sizes_that_cannot_be_are_usage_errors_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2 and f"argument {option}" in capsys.readouterr().err
