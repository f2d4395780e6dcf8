"""HTTP latency of a real server process: median and p95 per endpoint, JSON bodies as documented.

Run: python bench/server.py [--checkpoint demo] [--n 20]
Starts ``python -m cryolens.server.minimal_cryolens_server`` on a free port, times sequential
requests from one client (encode and decode included), then /health while a batch runs.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(fn, n: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cryolens.server.minimal_cryolens_server",
                               "-c", args.checkpoint, "--host", "127.0.0.1", "-p", str(port),
                               "--device", "cpu", "--log-level", "warning"])
    try:
        for _ in range(300):
            try:
                requests.get(base + "/health", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        session = requests.Session()
        rng = np.random.default_rng(0)
        volume = rng.standard_normal((48, 48, 48)).tolist()
        one = json.dumps({"input_volume": volume})
        batch = json.dumps({"input_volumes": rng.standard_normal((args.batch, 48, 48, 48)).tolist(),
                            "batch_size": args.batch})
        headers = {"Content-Type": "application/json"}

        def post(path: str, body: str, **extra):
            def call():
                response = session.post(base + path, data=body, headers=headers)
                response.raise_for_status()
                return response.json()
            return call

        print(f"checkpoint {args.checkpoint}; {args.n} sequential requests each; seconds, "
              "client encode excluded, decode included")
        print(f"{'request':<52} {'median':>8} {'p95':>8}")
        cases = [
            ("GET /health", lambda: session.get(base + "/health").json()),
            ("POST /extract_features", post("/extract_features", one)),
            ("POST /extract_gaussian_splats", post("/extract_gaussian_splats", one)),
            ("POST /reconstruct (documented defaults: segments on)",
             post("/reconstruct", json.dumps({"input_volume": volume,
                                              "use_segmented_decoder": True}))),
            ("POST /reconstruct (segments off)",
             post("/reconstruct", json.dumps({"input_volume": volume,
                                              "use_segmented_decoder": False}))),
        ]
        for name, fn in cases:
            median, p95 = timed(fn, args.n)
            print(f"{name:<52} {median:>8.4f} {p95:>8.4f}", flush=True)
        median, p95 = timed(post("/batch_process", batch), max(3, args.n // 5))
        print(f"{f'POST /batch_process ({args.batch} volumes, all outputs)':<52} {median:>8.4f} "
              f"{p95:>8.4f}  ({args.batch / median:.0f} volumes/s)")

        done = threading.Event()

        def long_batch():
            for _ in range(3):
                post("/batch_process", batch)()
            done.set()

        thread = threading.Thread(target=long_batch)
        thread.start()
        health = []
        while not done.is_set():
            start = time.perf_counter()
            session.get(base + "/health", timeout=10)
            health.append(time.perf_counter() - start)
            time.sleep(0.05)
        thread.join()
        print(f"/health during 3 batches: {len(health)} probes, max {max(health) * 1000:.1f} ms, "
              f"median {statistics.median(health) * 1000:.1f} ms")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
