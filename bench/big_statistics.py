"""One large JSON body to ``POST /statistics`` on a real server: how long it takes, how much the
server's peak memory grows, and how ``/health`` answers meanwhile.

Run: python bench/big_statistics.py [--mb 217] [--rounds 2] [--flat]

The volume is float64 noise written by orjson (~20 bytes a number) as planes of 256 x 256, or
with ``--flat`` as one flat list of numbers. The server (a small random model on the CPU) is
started once; each round POSTs the same body on a fresh connection while another thread GETs
``/health`` every 20 ms. Peak memory is the server process's ``VmHWM`` (Linux) before and
after all rounds; ``/health`` latency is over every probe sent while a POST was in flight.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import orjson
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import small_model_file, start_cli_server, stop_on_sigterm

PLANE = (256, 256)
PROBE_EVERY_S = 0.02


def body_of(mb: float, flat: bool) -> tuple[bytes, tuple[int, ...]]:
    """A JSON object {"volume": ...} of about ``mb`` MB."""
    numbers = int(mb * 1e6 / 20)
    shape = (numbers,) if flat else (max(1, numbers // (PLANE[0] * PLANE[1])), *PLANE)
    volume = np.random.default_rng(0).standard_normal(shape)
    return orjson.dumps({"volume": volume}, option=orjson.OPT_SERIALIZE_NUMPY), shape


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=217.0, help="body size in MB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flat", action="store_true", help="a 1-D list instead of planes")
    args = parser.parse_args()
    stop_on_sigterm()

    body, shape = body_of(args.mb, args.flat)
    print(f"body: {len(body) / 1e6:.1f} MB of JSON, volume shape {shape}")
    with tempfile.TemporaryDirectory() as folder:
        model = small_model_file(Path(folder) / "small.safetensors")
        server = start_cli_server(model)
        try:
            run(server, body, args.rounds)
        finally:
            server.stop()


def run(server, body: bytes, rounds: int) -> None:
    pool = urllib3.PoolManager(maxsize=2, retries=False)
    probe_pool = urllib3.PoolManager(maxsize=1, retries=False)
    for _ in range(20):  # warm both paths before the memory baseline
        probe_pool.request("GET", server.url + "/health")
    pool.request("POST", server.url + "/statistics", body=b'{"volume": [[1, 2], [3, 4]]}',
                 headers={"Content-Type": "application/json"})
    before = peak_rss_mib(server.process.pid)
    busy = threading.Event()
    stop = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            answer = probe_pool.request("GET", server.url + "/health", timeout=60)
            took = time.perf_counter() - started
            if busy.is_set() and answer.status == 200:
                latencies.append(took)
            time.sleep(PROBE_EVERY_S)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    times = []
    try:
        for _ in range(rounds):
            busy.set()
            started = time.perf_counter()
            answer = pool.request("POST", server.url + "/statistics", body=body,
                                  headers={"Content-Type": "application/json"}, timeout=300)
            times.append(time.perf_counter() - started)
            busy.clear()
            text = answer.data.decode()[:160]
            print(f"status {answer.status} in {times[-1]:.2f} s: {text}")
            time.sleep(0.5)
    finally:
        stop.set()
        prober.join()
    after = peak_rss_mib(server.process.pid)
    ms = sorted(1000 * t for t in latencies)
    print(f"POST /statistics: best {min(times):.2f} s, median {statistics.median(times):.2f} s")
    print(f"server peak RSS (VmHWM): {before:.0f} MiB before, {after:.0f} MiB after "
          f"(+{after - before:.0f} MiB, {(after - before) * 2**20 / len(body):.2f}x the body)")
    if ms:
        print(f"/health during the POSTs: {len(ms)} probes, p50 {statistics.median(ms):.1f} ms, "
              f"p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.1f} ms, worst {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
