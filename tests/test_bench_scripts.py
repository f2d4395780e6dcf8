"""Every benchmark script starts: ``python bench/X.py --help`` from the repository root.

The scripts run with bench/ first on the import path, where bench/http.py once shadowed the
standard library's ``http`` and broke every script that imports torch (bench/_path.py now
takes the folder off the path). These scripts are not run anywhere else in CI, so
bench/http.py, whose figures an issue's acceptance rests on, also runs end to end here at
its shortest.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter importing torch per script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def helped() -> dict[str, subprocess.CompletedProcess]:
    """``python bench/X.py --help`` of every script, two at a time (each mostly imports, on
    one core: together they take about half as long on two)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, f"bench/{script}", "--help"], check=False,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SCRIPTS, pool.map(run, SCRIPTS), strict=True))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script, helped):
    if script == "litserve_app.py":
        pytest.importorskip("litserve", reason="LitServe is an optional bench dependency")
    done = helped[script]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "usage" in (done.stdout + done.stderr).lower(), (done.stdout, done.stderr)


def test_litserve_app_serves_the_engines_embeddings(tmp_path):
    """bench/http.py's LitServe comparison: LitServe spawns its worker from the script, which
    must find its modules (bench/_path.py), and the worker runs the same engine as ours."""
    pytest.importorskip("litserve", reason="LitServe is an optional bench dependency")
    import io

    import numpy as np
    import requests
    from server_helpers import ServerProcess, free_port

    from cryolens.engine import Engine

    port = free_port()
    server = ServerProcess([sys.executable, "bench/litserve_app.py", "--port", str(port)], port,
                           cwd=ROOT)
    try:
        server.wait_healthy(120, path="/health")
        volume = np.random.default_rng(3).standard_normal((48, 48, 48)).astype(np.float32)
        buffer = io.BytesIO()
        np.save(buffer, volume)
        answer = requests.post(server.url + "/predict", timeout=60,
                               files={"file": ("particle.npy", buffer.getvalue())})
        assert answer.status_code == 200, answer.text
        expected = Engine.from_checkpoint("demo").features(volume[None]).embedding[0]
        np.testing.assert_allclose(answer.json()["embedding"], expected, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()


def test_http_bench_measures_every_row():
    """bench/http.py end to end at its shortest: a real server, every row measured, no request
    failed (a row with "errors" would mean the server answered the benchmark with an error)."""
    done = subprocess.run(
        [sys.executable, "bench/http.py", "--seconds", "0.4", "--count", "2", "--rounds", "1",
         "--no-litserve"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for row in ("JSON /reconstruct (segments on): p50 / p95",
                "binary /reconstruct (segments on): p50 / p95",
                "binary /batch_process of 32: particles/s",
                "binary /batch_process of 128: particles/s",
                "binary /extract_features, 1 client: requests/s",
                "binary /extract_features, 16 clients: requests/s"):
        assert row in out, out
        assert "% of the engine" in out.split(row, 1)[1].splitlines()[0], out
    assert "errors" not in out, out
    assert "x 1)" in out, out  # the 16-client row says what multiple of one client it is


@pytest.mark.parametrize("variant", ["cudnn-benchmark", "channels-last", "cublas-render",
                                     "ieee-render"])
def test_engine_bench_variant_runs(variant):
    """The GPU check's experiments (bench/gpu_check.sh) must not fail there for a flag's sake:
    each runs here on the CPU at its shortest and says which variant it measured. (compile is
    left out: ~1 minute of inductor on this CPU.)"""
    done = subprocess.run(
        [sys.executable, "bench/engine.py", "--models", "demo", "--threads", "1", "--batches",
         "1", "--min-time", "0", "--no-segments", "--variant", variant], check=False, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"variant {variant}" in done.stdout, done.stdout
    row = next(line.split() for line in done.stdout.splitlines()
               if line.split()[:2] == ["new", "1"])
    assert float(row[2]) > 0 and float(row[3]) > 0, done.stdout


def test_top_kernels_ranks_profiled_events():
    """bench/engine.py's kernel table, fed real profiler events (CPU ones here; CUDA on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from engine import top_kernels
    finally:
        sys.path.remove(str(ROOT / "bench"))
    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
        torch.exp(a)
    lines = top_kernels(prof.events(), 2)
    assert len(lines) == 2, lines
    shares = [float(line.split("%")[0]) for line in lines]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01, lines
    assert any("aten::matmul" in line or "aten::mm" in line for line in lines), lines
    assert "3x" in next(line for line in lines if "aten::m" in line), lines
