"""The ways a server process starts (CLI, uvicorn --workers, --reload), how it refuses to start,
and the CORS settings, each on a real process."""
from __future__ import annotations

import subprocess

import pytest
import requests
from server_helpers import PYTHON, small_model_file, start_cli_server, start_uvicorn

CLI = [PYTHON, "-m", "cryolens.server.minimal_cryolens_server"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


def assert_serves(url: str) -> None:
    assert requests.get(url + "/health", timeout=5).json() == {"status": "healthy"}
    info = requests.get(url + "/model_info", timeout=5).json()
    assert info["n_gaussians"] == 40 and info["checkpoint"] == "small.safetensors"


def test_uvicorn_with_two_workers(model, tmp_path):
    server = start_uvicorn(model, "--workers", "2", cwd=tmp_path)
    try:
        for _ in range(4):
            assert_serves(server.url)
    finally:
        server.stop()


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
    done = subprocess.run([*CLI, "--device", "tpu"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_list_versions():
    done = subprocess.run([*CLI, "--list-versions"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("v001 : ") and "\ndemo : " in done.stdout


def test_cors_list_of_origins(model):
    server = start_cli_server(model, "--cors", "https://example.com,https://app.example.com")
    try:
        ok = requests.get(server.url + "/health", headers={"Origin": "https://app.example.com"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "access-control-allow-credentials" not in ok.headers
        other = requests.get(server.url + "/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = requests.options(server.url + "/reconstruct", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 400
    finally:
        server.stop()


def test_cors_off(model):
    server = start_cli_server(model, "--cors", "")
    try:
        response = requests.get(server.url + "/health", headers={"Origin": "https://a.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = requests.options(server.url + "/reconstruct", headers={
            "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 405
    finally:
        server.stop()
