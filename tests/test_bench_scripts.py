"""Every benchmark script starts: ``python bench/X.py --help`` from the repository root.

The scripts run with bench/ first on the import path, where bench/http.py once shadowed the
standard library's ``http`` and broke every script that imports torch (bench/_path.py now
takes the folder off the path). These scripts are not run anywhere else in CI.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter importing torch per script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script):
    if script == "litserve_app.py":
        pytest.importorskip("litserve", reason="LitServe is an optional bench dependency")
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "usage" in (done.stdout + done.stderr).lower(), (done.stdout, done.stderr)
