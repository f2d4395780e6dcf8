"""Every documented way to start a server process (cryolens-server, cryolens serve, python -m,
uvicorn with and without --workers, --reload, make serve), each serving a non-default model with
non-default options; how it refuses to start. All on real processes, each started for its
test: all are marked slow. (The CORS settings, which need no process, are in
test_server_app.py.)"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from server_helpers import (
    PYTHON,
    START_TIMEOUT_S,
    ServerProcess,
    console_script,
    free_port,
    small_model_file,
    start_cli_server,
    start_command,
    start_uvicorn,
)

REPO = Path(__file__).resolve().parents[1]
CLI = [PYTHON, "-m", "cryolens.server.minimal_cryolens_server"]
SERVER_SCRIPT = console_script("cryolens-server", "cryolens.server.minimal_cryolens_server:main")
CRYOLENS_SCRIPT = console_script("cryolens", "cryolens.cli:main")
#: Non-default options every launcher is given, and how to see that each took effect.
ORIGIN = "https://app.example.org"
MAX_BODY_BYTES = 4096

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


def assert_serves(url: str) -> None:
    assert requests.get(url + "/health", timeout=5).json() == {"status": "healthy"}
    info = requests.get(url + "/model_info", timeout=5).json()
    assert info["n_gaussians"] == 40 and info["checkpoint"] == "small.safetensors"


def test_uvicorn_reload(model, tmp_path):
    server = start_uvicorn(model, "--reload", cwd=tmp_path)
    try:
        assert_serves(server.url)
    finally:
        server.stop()


def test_cli_reload_and_lowercase_log_level(model):
    server = start_cli_server(model, "--reload", "--log-level", "debug")
    try:
        assert_serves(server.url)
    finally:
        server.stop()


@pytest.mark.parametrize("args, fragment", [
    (["--checkpoint", "/nonexistent/model.ckpt"], "does not exist"),
    (["--checkpoint", "__MODEL__", "--device", "cuda"], "cuda"),
], ids=["missing checkpoint", "cuda without a GPU"])
def test_unloadable_checkpoint_exits_with_one_line(model, args, fragment):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [str(model) if a == "__MODEL__" else a for a in args]
    done = subprocess.run([*CLI, *args, "--port", "1", "--log-level", "warning"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cryolens-server: cannot load checkpoint") and fragment in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_bad_cli_values_are_usage_errors():
    done = subprocess.run([*CLI, "--device", "tpu"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_list_versions():
    done = subprocess.run([*CLI, "--list-versions"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("v001 : ") and "\ndemo : " in done.stdout


def assert_options_took_effect(url: str) -> None:
    """The server runs with --cors ORIGIN and --max-body-bytes MAX_BODY_BYTES, not the defaults."""
    allowed = requests.get(url + "/health", headers={"Origin": ORIGIN}, timeout=5)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = requests.get(url + "/health", headers={"Origin": "https://other.example"}, timeout=5)
    assert "access-control-allow-origin" not in other.headers
    small = requests.post(url + "/statistics", json={"volume": [1.0, 2.0]}, timeout=5)
    assert small.status_code == 200
    large = requests.post(url + "/statistics", json={"volume": [1.5] * MAX_BODY_BYTES}, timeout=5)
    assert large.status_code == 413


def launch(how: str, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The command line (and environment) that starts the server ``how`` with the small model,
    --cors ORIGIN and --max-body-bytes MAX_BODY_BYTES on 127.0.0.1:port."""
    options = ["--host", "127.0.0.1", "--device", "cpu", "--cors", ORIGIN,
               "--max-body-bytes", str(MAX_BODY_BYTES)]
    env = {"CRYOLENS_CHECKPOINT": str(model), "CRYOLENS_DEVICE": "cpu", "CRYOLENS_CORS": ORIGIN,
           "CRYOLENS_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    uvicorn = [PYTHON, "-m", "uvicorn", "cryolens.server.minimal_cryolens_server:app",
               "--host", "127.0.0.1", "--port", str(port)]
    return {
        "cryolens-server": ([*SERVER_SCRIPT, "-c", str(model), "-p", str(port), *options], {}),
        "cryolens serve": ([*CRYOLENS_SCRIPT, "serve", "--checkpoint", str(model),
                            "--port", str(port), *options], {}),
        "python -m": ([*CLI, "--checkpoint", str(model), "--port", str(port), *options], {}),
        "cryolens-server --workers 2": ([*SERVER_SCRIPT, "-c", str(model), "-p", str(port),
                                         "--workers", "2", *options], {}),
        "uvicorn": (uvicorn, env),
        "uvicorn --workers 2": ([*uvicorn, "--workers", "2"], env),
    }[how]


LAUNCHERS = ["cryolens-server", "cryolens serve", "python -m", "uvicorn",
             "cryolens-server --workers 2", "uvicorn --workers 2"]


@pytest.fixture(scope="module")
def launched(model, tmp_path_factory, request):
    """The launchers this run tests, all started at once: each process spends its start-up
    importing on one core, so on two cores they are ready in about half the time. Stopped at
    the end of the module."""
    wanted = [item.callspec.params["how"] for item in request.session.items
              if item.originalname == "test_every_launcher_serves_the_given_model_with_the_"
                                      "given_options"]
    servers = {}
    try:
        for how in wanted:
            port = free_port()
            args, env = launch(how, model, port)
            servers[how] = ServerProcess(args, port, env=env, cwd=tmp_path_factory.mktemp("cwd"))
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("how", LAUNCHERS)
def test_every_launcher_serves_the_given_model_with_the_given_options(launched, how):
    # started together: each may wait for the others' start-up
    server = launched[how].wait_healthy(timeout=len(launched) * START_TIMEOUT_S)
    for _ in range(3 if "workers" in how else 1):
        assert_serves(server.url)
        assert_options_took_effect(server.url)
    assert requests.get(server.url + "/model_info", timeout=5).json()["device"] == "cpu"


def make_serve_command(*variables: str) -> list[str]:
    """``make serve`` with this test's virtual environment, told never to (re)install it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"{sys.prefix} is not a virtual environment that make could use")
    # -o: treat the install stamp as up to date, so that make never runs pip here.
    return ["make", "--no-print-directory", "-C", str(REPO), "-o", f"{venv}/.installed", "serve",
            f"VENV={venv}", *variables]


def test_make_serve_with_checkpoint_port_and_device(model):
    port = free_port()
    server = start_command(make_serve_command(f"CHECKPOINT={model}", f"PORT={port}",
                                              "DEVICE=cpu"), port)
    try:
        assert_serves(server.url)
        assert requests.get(server.url + "/model_info", timeout=5).json()["device"] == "cpu"
    finally:
        server.stop()


@pytest.mark.parametrize("command", ["make serve", "cryolens-server"])
def test_busy_port_is_reported_before_the_model_loads(model, command):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if command == "make serve":
            args = make_serve_command(f"CHECKPOINT={model}", f"PORT={port}", "DEVICE=cpu")
        else:
            args = [*SERVER_SCRIPT, "-c", str(model), "--host", "127.0.0.1", "-p", str(port)]
        started = time.monotonic()
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert f"port {port} is already in use" in done.stderr and "--port N" in done.stderr
    if command == "make serve":
        assert "make serve PORT=N" in done.stderr
    else:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert "serving checkpoint" not in done.stdout + done.stderr  # the model never loaded
    assert elapsed < 30


@pytest.mark.parametrize("command, device", [("cryolens-server", "cuda:1"),
                                             ("cryolens serve", "cuda")])
def test_cuda_device_without_a_gpu_fails_in_one_line(model, command, device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prefix = SERVER_SCRIPT if command == "cryolens-server" else [*CRYOLENS_SCRIPT, "serve"]
    done = subprocess.run([*prefix, "-c", str(model), "--device", device, "--host", "127.0.0.1",
                           "--port", str(free_port()), "--log-level", "warning"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"device '{device}'" in lines[0] and "no CUDA" in lines[0]


def test_bad_environment_variable_is_one_line_and_help_still_works():
    env = {**os.environ, "CRYOLENS_PORT": "abc"}
    helped = subprocess.run([*SERVER_SCRIPT, "--help"], env=env, check=False,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: cryolens-server")
    assert helped.stderr == ""
    failed = subprocess.run(SERVER_SCRIPT, env=env, check=False, capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 2
    assert failed.stderr == "cryolens-server: CRYOLENS_PORT must be an integer, got 'abc'\n"
