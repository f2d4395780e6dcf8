"""Every Python example in the README runs as written. Examples that talk to a server at
``http://localhost:8023`` run against a real server (the demo model) on a free port."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
DOCUMENTED_URL = "http://localhost:8023"


@pytest.fixture(scope="module")
def demo_server():
    from server_helpers import start_cli_server

    server = start_cli_server("demo")
    yield server
    server.stop()


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, request):
    code = BLOCKS[index]
    if DOCUMENTED_URL in code:
        code = code.replace(DOCUMENTED_URL, request.getfixturevalue("demo_server").url)
    namespace: dict = {}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
