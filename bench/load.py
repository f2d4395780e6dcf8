"""Sustained mixed load on a server, as on a shared node: 16 clients for 60 s by default (after a
15 s warm-up), mixed endpoints and formats (JSON and .npy), /health probed every 100 ms.

Run: python bench/load.py [--url http://host:port] [--checkpoint demo] [--seconds 60]
     [--warm-up 15] [--clients 16] [--settle 30]

Without --url it starts its own server (CPU, the given checkpoint) and stops it at the end.
Prints errors by status, p50/p99 latency per endpoint and format, /health p99 and its worst,
and the server's resident memory (``process_resident_memory_bytes`` from /metrics) after the
warm-up and at the end of the load (medians of one reading a second over 10 s) and
``--settle`` seconds later, with the load average. The /health probe runs in a process of its
own, as a monitor would: in the clients' process it would wait for their GIL and time the load
generator, not the server.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import orjson
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import ServerProcess, free_port, stop_on_sigterm

from cryolens import formats

JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": formats.NPY_MEDIA_TYPE}
#: The first seconds of load are not timed: the server's caches, thread pools and malloc arenas
#: fill (RSS climbs for ~15 s under this mix, then swings around a level).
WARM_UP_S = 15.0
HEALTH_EVERY_S = 0.1
#: RSS is read this often during the load; the figures compare the medians of the first and the
#: last RSS_WINDOW_S (a single reading swings with the requests in flight at that instant).
RSS_EVERY_S = 1.0
RSS_WINDOW_S = 10.0


def requests_mix(rng: np.random.Generator) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, path, body, headers): each client walks this list in its own order."""
    one = rng.standard_normal((48, 48, 48)).astype(np.float32)
    four = rng.standard_normal((4, 48, 48, 48)).astype(np.float32)
    dumps = lambda value: orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return [
        ("features json", "/extract_features", dumps({"input_volume": one}), JSON),
        ("features npy", "/extract_features", formats.write_npy(one), NPY),
        ("reconstruct json", "/reconstruct", dumps({"input_volume": one}), JSON),
        ("reconstruct npy", "/reconstruct?use_segmented_decoder=false",
         formats.write_npy(one), NPY),
        ("splats json", "/extract_gaussian_splats", dumps({"input_volume": one}), JSON),
        ("batch4 npy", "/batch_process?return_reconstructions=false",
         formats.write_npy(four), NPY),
        ("batch4 json", "/batch_process", dumps({"input_volumes": four}), JSON),
        ("statistics json", "/statistics", dumps({"volume": one}), JSON),
    ]


def rss_mib(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    found = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) / 2**20 if found else float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def run(url: str, seconds: float, clients: int, settle: float, warm_up: float) -> None:
    stop = threading.Event()
    t0 = time.monotonic()
    timed_from, end = t0 + warm_up, t0 + warm_up + seconds
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter[tuple[str, int | str]] = Counter()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mix = requests_mix(rng)
        session = requests.Session()
        while not stop.is_set():
            name, path, body, headers = mix[int(rng.integers(len(mix)))]
            started = time.monotonic()
            try:
                status: int | str = session.post(url + path, data=body, headers=headers,
                                                 timeout=120).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            elapsed = time.monotonic() - started
            if started >= timed_from:
                with lock:
                    statuses[(name, status)] += 1
                    if status == 200:
                        latencies[name].append(elapsed)

    load_before = os.getloadavg()
    receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
    probe = multiprocessing.get_context("spawn").Process(
        target=probe_health, args=(url, timed_from, end, sending), daemon=True)
    probe.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, timed_from - time.monotonic()))
    rss: list[tuple[float, float]] = []  # (seconds after the warm-up, MiB), one a second
    while time.monotonic() < end:
        rss.append((time.monotonic() - timed_from, rss_mib(url)))
        time.sleep(max(0.0, min(RSS_EVERY_S, end - time.monotonic())))
    load_end = os.getloadavg()
    stop.set()
    health = receiving.recv()
    for thread in threads:
        thread.join(130)
    probe.join(10)
    time.sleep(settle)
    rss_settled = rss_mib(url)
    window = min(RSS_WINDOW_S, (end - timed_from) / 3)
    rss_warm = float(np.median([v for t, v in rss if t < window]))
    rss_end = float(np.median([v for t, v in rss if t >= end - timed_from - window]))

    timed = end - timed_from
    print(f"{clients} clients for {timed:.0f} s after a {warm_up:g} s warm-up "
          f"against {url}")
    print(f"load average (1, 5, 15 min): before {_load(load_before)}, at the end "
          f"{_load(load_end)} on {os.cpu_count()} CPUs")
    print(f"{'endpoint':18} {'ok':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name in sorted(latencies):
        values = latencies[name]
        print(f"{name:18} {len(values):6d} {len(values) / timed:7.2f} "
              f"{percentile(values, 50):8.1f} {percentile(values, 99):8.1f}")
    errors = {key: n for key, n in statuses.items() if key[1] != 200}
    by_status = Counter()
    for (_, status), n in errors.items():
        by_status[status] += n
    print("errors by status:", dict(by_status) or "none")
    for (name, status), n in sorted(errors.items(), key=str):
        print(f"  {name}: {status} x{n}")
    finite = [h for h in health if h != float("inf")]
    print(f"/health: {len(health)} probes, {len(health) - len(finite)} failed, "
          f"p50 {percentile(finite, 50):.1f} ms, p99 {percentile(finite, 99):.1f} ms, "
          f"worst {max(finite, default=float('nan')) * 1000:.1f} ms")
    values = [v for _, v in rss]
    print(f"RSS (median of the readings, one a second, in the first and the last {window:.0f} s "
          f"of the timed load): after warm-up {rss_warm:.0f} MiB, at the end {rss_end:.0f} MiB "
          f"({rss_end / rss_warm - 1:+.1%}), {settle:g} s later {rss_settled:.0f} MiB; "
          f"single readings {min(values):.0f}-{max(values):.0f} MiB")
    print("RSS every 10 s from the warm-up (MiB):",
          " ".join(f"{v:.0f}" for v in values[::int(10 / RSS_EVERY_S)]))


def probe_health(url: str, start_at: float, stop_at: float, results) -> None:
    """/health every 100 ms from ``start_at`` to ``stop_at`` (``time.monotonic()``, one clock
    for all processes here); sends the latencies (inf for a failure) through ``results``."""
    session = requests.Session()
    health: list[float] = []
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            ok = session.get(url + "/health", timeout=10).status_code == 200
        except requests.RequestException:
            ok = False
        elapsed = time.monotonic() - started
        if started >= start_at:
            health.append(elapsed if ok else float("inf"))
        time.sleep(max(0.0, HEALTH_EVERY_S - elapsed))
    results.send(health)


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def start_server(checkpoint: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "cryolens.server.minimal_cryolens_server",
                            "--checkpoint", checkpoint, "--host", "127.0.0.1", "--port",
                            str(port), "--device", "cpu", "--log-level", "warning"], port)
    return server.wait_healthy(timeout=180)


def main() -> None:
    stop_on_sigterm()  # servers started below are stopped on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--checkpoint", default="demo", help="for the server started here")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="timed load duration, after the warm-up")
    parser.add_argument("--warm-up", type=float, default=WARM_UP_S,
                        help=f"seconds of load before timing starts (default: {WARM_UP_S:g})")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds after the load before the last RSS reading")
    args = parser.parse_args()
    server = None if args.url else start_server(args.checkpoint)
    try:
        run(args.url or server.url, args.seconds, args.clients, args.settle, args.warm_up)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
