"""cryolens.heap: glibc's thresholds for batches of large arrays, and who sets them.

mallopt is process-wide, so each case runs in a fresh interpreter. The probe repeats what a
batch does: three 8 MiB arrays written, then freed together. With glibc's defaults the heap's
free top (24 MiB) is over its trim threshold (twice the largest block freed, 16 MiB), so it goes
back to the system after every round and the next round faults every page in again; with the
heap tuned the pages stay and later rounds fault none.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc (Linux) only")

PROBE = textwrap.dedent("""
    import resource

    import numpy as np

    def one_round():
        arrays = [np.ones(8 * 2**20 // 8) for _ in range(3)]
        del arrays

    def faults_of_a_round():
        for _ in range(3):
            one_round()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        one_round()
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
""")
#: Faults of a round: 6,144 4-KiB pages, or fewer where transparent huge pages back some.
FAULTING, REUSING = 200, 20


def run_probe(code: str, env: dict | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE + textwrap.dedent(code)], check=False,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_tuning_the_heap_makes_it_reuse_the_pages():
    """The same process before and after ``heap.tune()``: every round faulted in again with
    glibc's defaults (else there is nothing to show here), none after."""
    untuned, applied, tuned = run_probe("""
        from cryolens import heap
        untuned = faults_of_a_round()
        print(untuned, heap.tune(), faults_of_a_round())
    """)
    if int(untuned) <= FAULTING:
        pytest.skip(f"this malloc keeps the pages untuned ({untuned} faults a round)")
    assert applied == "True"
    assert int(tuned) < REUSING


@pytest.mark.parametrize("variable", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_the_users_own_malloc_settings_stand(variable):
    value = "glibc.malloc.trim_threshold=1000000" if variable == "GLIBC_TUNABLES" else "1000000"
    (applied,) = run_probe("""
        from cryolens import heap
        print(heap.tune())
    """, env={variable: value})
    assert applied == "False"


def test_trim_gives_memory_back():
    (gave,) = run_probe("""
        from cryolens import heap
        heap.tune()
        one_round()  # 24 MiB freed, kept at the heap's top
        print(heap.trim())
    """)
    assert gave == "True"


@pytest.mark.slow  # imports the server and loads the demo model in a fresh interpreter
def test_the_server_tunes_its_process_when_it_starts():
    faults = run_probe("""
        from starlette.testclient import TestClient

        from cryolens.server.app import create_app
        from cryolens.server.settings import Settings

        with TestClient(create_app(Settings(checkpoint="demo"))) as client:
            assert client.get("/health").status_code == 200
            print(faults_of_a_round())
    """)
    assert int(faults[-1]) < REUSING


@pytest.mark.slow  # the cryolens command in a fresh interpreter
def test_the_cryolens_command_tunes_its_process():
    faults = run_probe("""
        from cryolens import cli

        assert cli.main(["info"]) == 0
        print(faults_of_a_round())
    """)
    assert int(faults[-1]) < REUSING
