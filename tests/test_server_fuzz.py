"""Schemathesis over the server's own OpenAPI document, on a real process: every operation,
a bounded number of generated requests each, no 5xx and every answer as documented (status,
content type, body schema)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Generated requests per operation and phase (kept so the run stays under about a minute).
MAX_EXAMPLES = 8
CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
          "content_type_conformance")


def schemathesis_cli() -> str | None:
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else shutil.which("schemathesis")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server):
    """Against conftest.py's shared small-model server: the generated requests change nothing
    that other tests read."""
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    done = subprocess.run(
        [cli, "run", server.url + "/openapi.json", "--max-examples", str(MAX_EXAMPLES),
         "--checks", CHECKS, "--seed", "9", "--no-color"],
        capture_output=True, text=True, timeout=180, check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1], report[-4000:]
