"""Start-up checks before the port is bound (issue #25, class 7), on real processes: a missing
or unsafe checkpoint, or a device that is not there, is one line and exit 3 before uvicorn
announces anything, and /health never answers meanwhile; a good start logs the checkpoint's
name, sha256 and device once."""
from __future__ import annotations

import functools
import hashlib
import subprocess
import time

import pytest
import requests
import torch
from server_helpers import PYTHON, ServerProcess, free_port, small_model_file, start_cli_server

CLI = [PYTHON, "-m", "cryolens.server.minimal_cryolens_server"]


pytestmark = pytest.mark.slow  # each test starts server processes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="module")
def unsafe(tmp_path_factory):
    """A torch.save file whose pickle names a callable: loading it would run code."""
    path = tmp_path_factory.mktemp("unsafe") / "unsafe.pt"
    torch.save({"weight": torch.zeros(2), "hook": functools.partial(print, "ran")}, path)
    return path


def cases(model, unsafe):
    return {"missing": (["-c", "/nonexistent/model.ckpt"], "does not exist"),
            "unsafe": (["-c", str(unsafe)], "would run code"),
            "cuda": (["-c", str(model), "--device", "cuda"], "no CUDA")}


@pytest.mark.parametrize("case", ["missing", "unsafe", "cuda"])
def test_a_server_that_cannot_serve_says_so_before_binding(model, unsafe, case):
    args, fragment = cases(model, unsafe)[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    port = free_port()
    server = ServerProcess([*CLI, *args, "--host", "127.0.0.1", "--port", str(port)], port)
    try:
        answered = []
        while server.process.poll() is None:  # /health never answers, not even once
            try:
                answered.append(requests.get(server.url + "/health", timeout=1).status_code)
            except requests.RequestException:
                pass
            time.sleep(0.05)
        code = server.process.wait(60)
        output = server.output()
    finally:
        server.stop()
    assert code == 3 and answered == [], (code, answered, output)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("cryolens-server: cannot load checkpoint") and fragment in lines[0]
    assert "Uvicorn running on" not in output and "Traceback" not in output


def test_a_good_start_logs_checkpoint_name_sha256_and_device_once(model):
    server = start_cli_server(model)
    try:
        output = server.output()
    finally:
        server.stop()
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    line = f"serving checkpoint {model.name} (sha256 {sha}) on cpu"
    assert output.count(line) == 1, output
    assert output.index(line) < output.index("Uvicorn running on")


def test_bad_settings_fail_the_same_way_under_uvicorn_workers(model):
    """--workers N: the parent checks the checkpoint before it binds, so a bad one never
    starts the children."""
    done = subprocess.run([*CLI, "-c", "/nonexistent/model.ckpt", "--workers", "2", "--host",
                           "127.0.0.1", "--port", str(free_port())],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "Uvicorn running on" not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
