"""Every Python example and every curl command in the README runs as written; the ones that talk
to ``localhost:8023`` run against a real server process on the demo model (port rewritten)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from server_helpers import PYTHON, start_cli_server

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)
SHELL = [block for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.DOTALL)
         if "curl" in block and "localhost:8023" in block]
#: The README's recipe for the request bodies its curl examples read (body.json).
BODY_RECIPE = re.search(r'`(python -c "import json, numpy;.*?body\.json.*?)`', TEXT)
DOCUMENTED = "localhost:8023"


def needs_server(block: str) -> bool:
    return DOCUMENTED in block


@pytest.fixture(scope="module")
def server():
    proc = start_cli_server("demo")
    yield proc
    proc.stop()


def test_readme_has_examples():
    assert BLOCKS and SHELL and BODY_RECIPE


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, request, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if needs_server(code):
        server = request.getfixturevalue("server")
        code = code.replace(DOCUMENTED, f"127.0.0.1:{server.port}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("index", range(len(SHELL)))
def test_readme_curl_examples_run(index, server, tmp_path):
    recipe = BODY_RECIPE.group(1).replace("python ", f"{PYTHON} ", 1)
    subprocess.run(recipe, shell=True, cwd=tmp_path, check=True)  # noqa: S602
    script = SHELL[index].replace(DOCUMENTED, f"127.0.0.1:{server.port}")
    script = re.sub(r"^python ", f"{PYTHON} ", script, flags=re.MULTILINE)
    lines = [line for line in script.splitlines() if line.strip()]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"detail"' not in done.stdout, done.stdout  # no error bodies
    if "-o " in script:
        for name in re.findall(r"-o (\S+)", script):
            written = (tmp_path / name).read_bytes()
            assert written[:2] == b"PK" if name.endswith(".npz") else written, written[:200]
