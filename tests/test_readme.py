"""Every example in the README and in docs/ is exercised: each Python block runs as written, and
each shell command is run, dry-run or parsed by the real parser, as ``exercise`` decides.

Shell commands, by program:

- ``curl``: run against a live server on the demo model (``localhost:8023`` is replaced by its
  address), in a folder where the documented ``python -c`` line has written ``body.json``;
- ``make``: dry-run (``make -n``), with the install stamp taken as up to date;
- ``cryolens``, ``cryolens-server``, ``python -m cryolens...``: parsed by the command's own parser
  and its values checked by ``Settings``; those that are quick (``--help``, ``cryolens info``)
  run. Starting servers for real, with other values, is test_server_processes.py's job;
- ``uvicorn``: the app it names exists and every ``CRYOLENS_*`` variable it sets is a setting;
- ``napari``: not started (it opens a window); the plugin it documents must be installed where
  napari is;
- installs (``pip``, ``python3 -m venv``) and ``docker``: never run (they need the network);
  the PyTorch version they pin must be the Makefile's.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for block in re.findall(rf"```{language}\n(.*?)```", document.read_text(), flags=re.DOTALL):
            found.append((document.relative_to(REPO).as_posix(), block))
    return found


def shell_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """(document, argv, environment) of every command in the ``bash`` blocks."""
    commands = []
    for document, block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            parts: list[list[str]] = [[]]
            for token in shlex.split(line, comments=True):
                if token == "&&":
                    parts.append([])
                else:
                    parts[-1].append(token)
            for tokens in parts:
                if tokens and tokens[-1] == "&":
                    tokens.pop()
                env = {}
                while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
                    name, _, value = tokens.pop(0).partition("=")
                    env[name] = value
                if tokens:
                    commands.append((document, tokens, env))
    return commands


PYTHON_BLOCKS = blocks("python")
COMMANDS = shell_commands()
# installs, shell state, containers, clusters (tests/test_ray.py starts its own)
NOT_RUN = {"pip", "python3", ".", "docker", "rm", "ray", "kubectl"}


def test_documents_have_examples():
    assert PYTHON_BLOCKS and len(COMMANDS) > 30


@pytest.mark.parametrize("document, block", PYTHON_BLOCKS,
                         ids=[f"{doc}:{i}" for i, (doc, _) in enumerate(PYTHON_BLOCKS)])
def test_python_example_runs(document, block, request, tmp_path, monkeypatch):
    if "localhost:8023" in block:  # a server example: against the live demo server
        address = request.getfixturevalue("server").url.removeprefix("http://")
        block = block.replace("localhost:8023", address)
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace: dict = {}
    exec(compile(block, f"{document} python block", "exec"), namespace)  # noqa: S102


@pytest.fixture(scope="module")
def server(demo_server):
    """The examples run against the demo model (conftest.py's shared process)."""
    return demo_server


@pytest.fixture(scope="module")
def body_folder(tmp_path_factory):
    """A folder with the files the curl examples send (body.json, particle.npy), written by
    the documented ``python -c`` commands themselves."""
    folder = tmp_path_factory.mktemp("body")
    for _, argv, _ in COMMANDS:
        if argv[:2] == ["python", "-c"]:
            subprocess.run([sys.executable, *argv[1:]], cwd=folder, check=True, timeout=120)
    return folder


def check_server_command(argv: list[str], prog: str, env: dict[str, str]) -> None:
    from cryolens.server.minimal_cryolens_server import build_parser
    from cryolens.server.settings import Settings

    settings = Settings.from_env(env)
    args = build_parser(settings, prog).parse_args(argv)
    Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


def run_help(argv: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "cryolens.cli", *argv], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def exercise(argv: list[str], env: dict[str, str], request) -> None:
    program = argv[0]
    if program == "curl":
        exercise_curl(argv, request)
    elif program == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        venv = Path(sys.prefix)
        done = subprocess.run(["make", "-n", "-C", str(REPO), "-o", f"{venv}/.installed",
                               f"VENV={venv}", *argv[1:]], check=False, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    elif program == "cryolens":
        exercise_cryolens(argv, env)
    elif program == "cryolens-server":
        check_server_command(argv[1:], "cryolens-server", env)
    elif program == "python" and argv[1:3] == ["-m", "cryolens.server.minimal_cryolens_server"]:
        check_server_command(argv[3:], "cryolens-server", env)
    elif program == "python" and argv[1] == "-c":
        request.getfixturevalue("body_folder")  # ran it
    elif program == "uvicorn":
        from cryolens.server import minimal_cryolens_server
        from cryolens.server.settings import Settings

        assert argv[1] == minimal_cryolens_server.APP_IMPORT_STRING
        names = {f"CRYOLENS_{f.name.upper()}" for f in dataclasses.fields(Settings)}
        assert {k for k in env if k.startswith("CRYOLENS_")} <= names
        Settings.from_env(env)
    elif program == "serve":  # Ray Serve's CLI: the app it names, configured by CRYOLENS_*
        from cryolens.server.ray import RayOptions  # imports no Ray
        from cryolens.server.settings import Settings

        assert argv[1:] == ["run", "cryolens.server.ray:app"]
        Settings.from_env(env)
        RayOptions.from_env(env)
    elif program == "napari":  # opens a window: check the plugin it documents is installed
        pytest.importorskip("napari", reason="napari is not installed")
        from importlib.metadata import entry_points

        names = {e.name for e in entry_points(group="napari.manifest")}
        if "napari-cryolens" not in names:
            pytest.skip("napari-cryolens is not installed (pip install ./napari-cryolens)")
    elif program in NOT_RUN:
        check_not_run(program, argv)
    else:
        pytest.fail(f"no test exercises {shlex.join(argv)}: teach tests/test_readme.py how")


def exercise_curl(argv: list[str], request) -> None:
    server, folder = request.getfixturevalue("server"), request.getfixturevalue("body_folder")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    address = server.url.removeprefix("http://")
    args = [a.replace("localhost:8023", address) for a in argv]
    done = subprocess.run(args, cwd=folder, check=False, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[:300]
    if "-o" in args:  # a binary answer written to a file: .npz is a zip archive
        written = (folder / args[args.index("-o") + 1]).read_bytes()
        assert written[:2] == b"PK", written[:300]
    else:
        assert done.stdout.startswith(b"{") and b'"detail"' not in done.stdout, \
            done.stdout[:300]


def exercise_cryolens(argv: list[str], env: dict[str, str]) -> None:
    if argv[1:2] == ["serve"]:
        if "--help" in argv:
            assert run_help(argv[1:]).startswith("usage: cryolens serve")
        else:
            check_server_command(argv[2:], "cryolens serve", env)
        return
    from cryolens import cli

    args = cli.parse_args(argv[1:])
    if getattr(args, "command", None) == "info" and (args.checkpoint is None
                                                     or args.log_level == "DEBUG"):
        if args.log_level == "DEBUG":  # the documented traceback of a missing file
            from cryolens.errors import CheckpointError

            with pytest.raises(CheckpointError):
                cli.main(argv[1:])
        else:
            assert cli.main(argv[1:]) == 0


def check_not_run(program: str, argv: list[str]) -> None:
    """A documented command this test does not run: the versions and files it names exist."""
    pin = re.search(r"torch==([\d.]+)", " ".join(argv))
    if pin:
        makefile = (REPO / "Makefile").read_text()
        assert f"TORCH_VERSION ?= {pin.group(1)}\n" in makefile
    if program == "docker" and argv[1] == "build":
        dockerfile = argv[argv.index("-f") + 1] if "-f" in argv else "Dockerfile"
        assert (REPO / dockerfile).is_file()


@pytest.mark.parametrize("document, argv, env", COMMANDS,
                         ids=[f"{doc}:{shlex.join(argv)[:60]}" for doc, argv, _ in COMMANDS])
def test_shell_command_is_exercised(document, argv, env, request, monkeypatch):
    for name in [n for n in os.environ if n.startswith("CRYOLENS_")]:
        monkeypatch.delenv(name)
    exercise(argv, env, request)


def test_model_info_example_is_what_the_default_model_answers(server):
    """docs/rest-api.md shows /model_info of the default (demo) model, number for number."""
    text = (REPO / "docs" / "rest-api.md").read_text()
    example = text[text.index("curl -s localhost:8023/model_info"):].split("```")[0]
    answer = requests.get(server.url + "/model_info", timeout=5).json()
    documented = dict(re.findall(r'"(\w+)": ("[^"]*"|[\d.]+|\[[\d, ]+\])', example))
    assert set(documented) == set(answer)
    for key, value in documented.items():
        if key != "sha256":
            assert str(answer[key]).replace("'", '"') == value.strip('"'), key
    assert answer["sha256"].startswith(documented["sha256"].strip('".'))
