"""Memory bounded by the body: ``/statistics`` of any dtype and a refused JSON batch cost a
real server at most 4x the body in peak RSS (measured ~1-2.5x: ``bench/body_memory.py``);
``operations.statistics`` itself needs a fixed few MiB whatever the array's size. Peak memory,
not time, is what is asserted."""
from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import urllib3
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cryolens import formats, operations
from cryolens.operations import STATISTICS_BLOCK, statistics

#: What a request may cost the server beyond its RSS just before, per byte of body.
MAX_PEAK_PER_BODY_BYTE = 4


@pytest.mark.parametrize("dtype", ["u1", "<i2", "<f4", ">f8"])
def test_statistics_work_in_fixed_memory_whatever_the_dtype(dtype):
    values = np.random.default_rng(0).integers(0, 200, 8 * STATISTICS_BLOCK).astype(dtype)
    expected = values.astype(np.float64)
    tracemalloc.start()
    try:
        got = statistics(values.reshape(-1, 64, 64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 3 * 8 * STATISTICS_BLOCK  # a block in float64, and its centred copy
    assert got["mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(expected.std(), rel=1e-12)
    assert (got["min"], got["max"]) == (expected.min(), expected.max())
    assert got["shape"] == [8 * STATISTICS_BLOCK // 4096, 64, 64]


def test_statistics_of_a_fortran_array_and_of_huge_values_are_numpys():
    array = np.asfortranarray(np.random.default_rng(1).standard_normal((70, 80, 90)))
    got = statistics(array)
    assert got["mean"] == pytest.approx(array.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(array.std(), rel=1e-12)
    huge = np.array([1e300, -1e300, 5e299])
    got = statistics(huge)
    assert np.isfinite(got["std"]) and got["std"] == pytest.approx(
        (huge / 1e300).std() * 1e300, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(st.sampled_from(["u1", "<i2", ">i4", "<i8", "<f2", "<f4", ">f8"]),
                  hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
                  elements={"allow_nan": False, "allow_infinity": False}),
       st.integers(1, 40), st.booleans())
def test_statistics_merged_block_by_block_are_numpys(values, block, fortran):
    """Any finite array, blocks of any size (the merge runs across many of them), C or Fortran
    order: numpy's float64 mean, std, min and max, to float64 rounding of the largest value."""
    values = np.asfortranarray(values) if fortran else values
    wide = values.astype(np.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(operations, "STATISTICS_BLOCK", block)
        got = statistics(values)
    scale = max(1.0, float(np.abs(wide).max()))
    unit = wide / scale  # numpy's own squares overflow beyond ~1e154; these values' do not
    assert got["mean"] == pytest.approx(unit.mean() * scale, rel=1e-9, abs=1e-12 * scale)
    assert got["std"] == pytest.approx(unit.std() * scale, rel=1e-6, abs=1e-7 * scale)
    assert (got["min"], got["max"]) == (wide.min(), wide.max())
    assert got["shape"] == list(values.shape)


# -- a real server ---------------------------------------------------------------------------
def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for process {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    from server_helpers import small_model_file, start_cli_server

    model = small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")
    proc = start_cli_server(model)
    try:
        Path(f"/proc/{proc.process.pid}/clear_refs").write_text("5")
    except OSError as exc:
        proc.stop()
        pytest.skip(f"cannot reset the server's peak RSS: {exc}")
    yield proc
    proc.stop()


def peak_growth(server, path: str, body: bytes, headers: dict) -> tuple[int, int]:
    """(status, bytes of peak RSS the request added) of one request."""
    pool = urllib3.PoolManager(retries=False)
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak restarts from the current RSS
    before = rss_kib(pid, "VmRSS")
    answer = pool.request("POST", server.url + path, body=body, headers=headers, timeout=300)
    return answer.status, (rss_kib(pid, "VmHWM") - before) * 1024


NPY = {"Content-Type": formats.NPY_MEDIA_TYPE}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["u1", "<i2", "<f4", "<f8"])
def test_statistics_peak_memory_is_bounded_by_the_body(server, dtype):
    """The issue's case: 64 MiB of uint8 cost +1,088 MiB (17x) in float64 copies."""
    values = np.random.default_rng(2).integers(0, 100, (32 * 2**20) // np.dtype(dtype).itemsize)
    body = formats.write_npy(values.astype(dtype).reshape(-1, 256))
    status, growth = peak_growth(server, "/statistics", body, NPY)
    assert status == 200
    assert growth <= MAX_PEAK_PER_BODY_BYTE * len(body), f"{growth / len(body):.2f}x the body"


@pytest.mark.slow
def test_a_refused_json_batch_of_empty_volumes_costs_at_most_4x_its_body(server):
    """Seven million empty volumes (32 MiB of JSON): 413, and no per-volume objects made."""
    body = b'{"input_volumes": [' + b", ".join([b"[]"] * 7_000_000) + b"]}"
    status, growth = peak_growth(server, "/batch_process", body,
                                 {"Content-Type": "application/json"})
    assert status == 413
    assert growth <= MAX_PEAK_PER_BODY_BYTE * len(body), f"{growth / len(body):.2f}x the body"
