"""cryolens-client installed alone (client/, no PyTorch): its wheel builds, installs into a fresh
virtual environment, and there ``cryolens embed --server`` writes the table an in-process
``cryolens embed`` writes, ``cryolens map`` draws it, and local inference says in one line what
to install.

The client's dependencies come from the package index (pip's cache makes a second run quick);
set CRYOLENS_WHEELHOUSE to a folder of wheels to install with ``--no-index`` from it instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from io_helpers import particle_stack, write_mrc
from server_helpers import small_model_file, start_cli_server

from cryolens.cli import main
from cryolens.embtable import metadata_of

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("torch", "fastapi", "uvicorn", "cryolens-server")

pytestmark = pytest.mark.slow

# the Python client in the client-only environment, from there and not from this checkout
PYTHON_API = """
import sys
import numpy as np
import cryolens.client
from cryolens.client import CryoLensClient

with CryoLensClient(sys.argv[1]) as client:
    out = client.extract_features(np.ones((2, 48, 48, 48), np.float32))
assert cryolens.client.__file__.startswith(sys.prefix), cryolens.client.__file__
assert "torch" not in sys.modules
print(out["embedding"].shape, "ok")
"""


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    # without PYTHONPATH: the fresh environment must not see this checkout's sources
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          check=False, **kwargs)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the cryolens-client wheel and its dependencies only."""
    root = tmp_path_factory.mktemp("client-only")
    source = root / "client"  # built from a copy: no build/ left in the checkout
    shutil.copytree(REPO / "client", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    wheels = root / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-w", wheels, source], timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("cryolens_client-*.whl")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", venv], timeout=120)
    assert made.returncode == 0, made.stderr
    house = os.environ.get("CRYOLENS_WHEELHOUSE")
    index = ["--no-index", "--find-links", house] if house else []
    installed = run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", *index, wheel],
                    timeout=600)
    if installed.returncode != 0 and not house and "No matching distribution" in installed.stderr:
        pytest.skip(f"the client's dependencies could not be installed (offline?): "
                    f"{installed.stderr.strip().splitlines()[-1]}")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def test_the_client_alone_installs_without_pytorch_or_the_server(client_venv):
    listed = run([client_venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"])
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "cryolens-client" in names
    assert not names & set(SERVER_ONLY), sorted(names & set(SERVER_ONLY))
    code = ("import sys, cryolens.client, cryolens.io, cryolens.cli; "
            "cryolens.cli.build_parser(); "
            "print(sorted({'torch', 'fastapi', 'uvicorn'} & set(sys.modules)))")
    done = run([client_venv / "bin" / "python", "-c", code], cwd=client_venv)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr
    helped = run([client_venv / "bin" / "cryolens", "--help"], cwd=client_venv)
    assert helped.returncode == 0 and "embed" in helped.stdout and "train" in helped.stdout


@pytest.mark.parametrize("argv", [["info"], ["info", "demo", "--json"], ["serve"],
                                  ["train", "--steps", "1"], ["evaluate"],
                                  ["embed", "particles/", "-o", "out.parquet"],
                                  ["reconstruct", "particles/", "-o", "out/"],
                                  ["show", "particles/", "-o", "show.png"]])
def test_local_inference_says_in_one_line_what_to_install(client_venv, argv):
    done = run([client_venv / "bin" / "cryolens", *argv], cwd=client_venv)
    assert done.returncode == 3
    assert done.stderr == "cryolens: install cryolens-server for local inference\n"


def test_embed_on_a_server_from_the_client_alone_writes_the_in_process_table(
        client_venv, tmp_path, capsys):
    model = small_model_file(tmp_path / "model.safetensors")
    folder = tmp_path / "particles"
    folder.mkdir()
    for i, particle in enumerate(particle_stack(5)):
        write_mrc(folder / f"p{i}.mrc", particle)
    local = tmp_path / "local.parquet"
    assert main(["embed", str(folder), "-o", str(local), "--checkpoint", str(model),
                 "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    server = start_cli_server(model)
    try:
        remote = tmp_path / "remote.parquet"
        done = run([client_venv / "bin" / "cryolens", "embed", folder, "-o", remote,
                    "--server", server.url, "--quiet"], cwd=tmp_path, timeout=300)
        called = run([client_venv / "bin" / "python", "-c", PYTHON_API, server.url],
                     cwd=tmp_path, timeout=120)
    finally:
        server.stop()
    assert called.returncode == 0 and called.stdout == "(2, 8) ok\n", called.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("embedded 5 particles in ")
    want, got = pq.read_table(local), pq.read_table(remote)
    assert got.column_names == want.column_names
    numbers = [c for c in want.column_names if c.startswith(("embedding_", "pose_", "global"))]
    assert numbers
    for name in numbers:
        np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), atol=1e-5)
    for name in set(want.column_names) - set(numbers):
        assert got[name].to_pylist() == want[name].to_pylist(), name
    want_meta, got_meta = metadata_of(want), metadata_of(got)
    assert got_meta.pop("server") == server.url and want_meta.pop("server") is None
    assert got_meta["identity"].pop("server") == server.url
    assert want_meta["identity"].pop("server") is None
    del got_meta["created"], want_meta["created"]  # the time each was written
    assert got_meta == want_meta and got_meta["checkpoint_sha256"]
    mapped = run([client_venv / "bin" / "cryolens", "map", remote, "-o", tmp_path / "map.png"],
                 cwd=tmp_path, timeout=300)  # no model needed: works with the client alone
    assert mapped.returncode == 0 and (tmp_path / "map.png").stat().st_size > 0, mapped.stderr
