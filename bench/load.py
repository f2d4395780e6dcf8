"""Sustained mixed load on a server, as on a shared node: 32 clients for 60 s by default (after a
15 s warm-up), every volume endpoint with stacks of 1-64 volumes (.npy, answered as .npz; JSON
for one or two volumes), /health probed every 100 ms.

Run: python bench/load.py [--url http://host:port] [--checkpoint demo] [--seconds 60]
     [--warm-up 15] [--clients 32] [--settle 30]

Without --url it starts its own server (CPU, the given checkpoint, a queue as deep as the
clients and a request timeout the deepest queue fits in: 32 clients of 64-volume stacks on 2
cores wait minutes, not the default 60 s) and stops it at the end.
Prints p50/p99 latency per request kind, and then the figures the server is held to (issue
#25): errors (answers other than 200), unanswered requests (no answer at all, or still
waiting at the end), /health p99 (< 100 ms), and the server's resident memory
(``process_resident_memory_bytes`` from /metrics) after the warm-up against ``--settle``
seconds after the load (within 10 %), with the load average. The /health probe runs in a
process of its own, as a monitor would: in the clients' process it would wait for their GIL
and time the load generator, not the server.
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
NPY = {"Content-Type": formats.NPY_MEDIA_TYPE, "Accept": formats.NPZ_MEDIA_TYPE}
#: The first seconds of load are not timed: the server's caches, thread pools and malloc arenas
#: fill (RSS climbs for ~15 s under this mix, then swings around a level).
WARM_UP_S = 15.0
HEALTH_EVERY_S = 0.1
#: RSS is read this often during the load; the figures compare the medians of the first and the
#: last RSS_WINDOW_S (a single reading swings with the requests in flight at that instant).
RSS_EVERY_S = 1.0
RSS_WINDOW_S = 10.0
#: Seconds a client waits for one answer before it counts the request as unanswered.
CLIENT_TIMEOUT_S = 600.0
#: Volumes per request, drawn uniformly: 1 to 64 in powers of two.
STACK_SIZES = (1, 2, 4, 8, 16, 32, 64)
#: What the server is held to (issue #25).
HEALTH_P99_LIMIT_MS = 100.0
RSS_GROWTH_LIMIT = 0.10
#: Settings of the server started here: a queue for every client, and a request timeout that
#: the deepest queue fits in.
SERVER_FLAGS = ("--queue-size", "64", "--request-timeout-s", "600")
#: The volume endpoints, with the options that vary between requests.
ENDPOINTS = (
    ("reconstruct", "/reconstruct?use_segmented_decoder=false"),
    ("reconstruct+segments", "/reconstruct"),
    ("features", "/extract_features?return_variance=true"),
    ("splats", "/extract_gaussian_splats"),
    ("batch", "/batch_process?return_reconstructions=false"),
    ("statistics", "/statistics"),
)
JSON_FIELD = {"/batch_process": "input_volumes", "/statistics": "volume"}


class Mix:
    """Request bodies, made once and shared by the clients: an .npy stack of each size, and
    JSON bodies of one and two volumes."""

    def __init__(self, rng: np.random.Generator) -> None:
        stack = rng.standard_normal((max(STACK_SIZES), 48, 48, 48)).astype(np.float32)
        self.npy = {n: formats.write_npy(stack[:n]) for n in STACK_SIZES}
        self.stack = stack

    def json_body(self, path: str, n: int) -> bytes:
        field = next((f for p, f in JSON_FIELD.items() if path.startswith(p)), "input_volume")
        value = self.stack[:n] if n > 1 or field == "input_volumes" else self.stack[0]
        return orjson.dumps({field: value}, option=orjson.OPT_SERIALIZE_NUMPY)

    def draw(self, rng: np.random.Generator) -> tuple[str, str, bytes, dict[str, str]]:
        """(kind, path, body, headers) of one request."""
        name, path = ENDPOINTS[int(rng.integers(len(ENDPOINTS)))]
        n = int(rng.choice(STACK_SIZES))
        if n <= 2 and rng.random() < 0.5:
            if path.startswith(("/statistics", "/batch")):
                return f"{name} json", path, self.json_body(path, n), JSON
            if n == 1:
                return f"{name} json", path, self.json_body(path, 1), JSON
        return f"{name} npy", path, self.npy[n], NPY


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

    mix = Mix(np.random.default_rng(0))
    waiting: Counter[int] = Counter()  # requests each client has in flight (0 or 1)

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        session = requests.Session()
        while not stop.is_set():
            name, path, body, headers = mix.draw(rng)
            started = time.monotonic()
            waiting[seed] = 1
            try:
                status: int | str = session.post(url + path, data=body, headers=headers,
                                                 timeout=CLIENT_TIMEOUT_S).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            waiting[seed] = 0
            elapsed = time.monotonic() - started
            if started >= timed_from:
                with lock:
                    statuses[(name, status)] += 1
                    if status == 200:
                        latencies[name].append(elapsed)

    rss_idle = rss_mib(url)
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
    join_until = time.monotonic() + CLIENT_TIMEOUT_S + 10
    for thread in threads:
        thread.join(max(0.0, join_until - time.monotonic()))
    still_waiting = sum(waiting.values())
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
    errors = {key: n for key, n in statuses.items() if isinstance(key[1], int) and key[1] != 200}
    unanswered = {key: n for key, n in statuses.items() if isinstance(key[1], str)}
    by_status = Counter()
    for (_, status), n in [*errors.items(), *unanswered.items()]:
        by_status[status] += n
    print("non-200 answers and failures by status:", dict(by_status) or "none")
    for (name, status), n in sorted([*errors.items(), *unanswered.items()], key=str):
        print(f"  {name}: {status} x{n}")
    finite = [h for h in health if h != float("inf")]
    health_p99 = percentile(finite, 99)
    print(f"/health: {len(health)} probes, {len(health) - len(finite)} failed, "
          f"p50 {percentile(finite, 50):.1f} ms, p99 {health_p99:.1f} ms, "
          f"worst {max(finite, default=float('nan')) * 1000:.1f} ms")
    values = [v for _, v in rss]
    print(f"RSS (median of the readings, one a second, in the first and the last {window:.0f} s "
          f"of the timed load): after warm-up {rss_warm:.0f} MiB, at the end {rss_end:.0f} MiB "
          f"({rss_end / rss_warm - 1:+.1%}), {settle:g} s later {rss_settled:.0f} MiB; "
          f"single readings {min(values):.0f}-{max(values):.0f} MiB")
    print("RSS every 10 s from the warm-up (MiB):",
          " ".join(f"{v:.0f}" for v in values[::int(10 / RSS_EVERY_S)]))
    answered = sum(n for (_, status), n in statuses.items() if isinstance(status, int))
    growth = rss_settled / rss_warm - 1
    n_errors, n_unanswered = sum(errors.values()), sum(unanswered.values()) + still_waiting
    print("-- held to (issue #25) --")
    print(f"requests answered: {answered} (timed)")
    print(f"errors: {n_errors} {_verdict(n_errors == 0)}")
    print(f"unanswered: {n_unanswered} ({still_waiting} still waiting at the end) "
          f"{_verdict(n_unanswered == 0)}")
    print(f"/health p99: {health_p99:.1f} ms, limit {HEALTH_P99_LIMIT_MS:g} ms "
          f"{_verdict(health_p99 < HEALTH_P99_LIMIT_MS and len(finite) == len(health))}")
    print(f"RSS {settle:g} s after the load against after the warm-up: {growth:+.1%}, limit "
          f"{RSS_GROWTH_LIMIT:.0%} {_verdict(growth <= RSS_GROWTH_LIMIT)}; idle before the "
          f"load {rss_idle:.0f} MiB, settled after it {rss_settled:.0f} MiB")


def _verdict(ok: bool) -> str:
    return "(ok)" if ok else "(FAILED)"


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
                            str(port), "--device", "cpu", "--log-level", "warning",
                            *SERVER_FLAGS], port)
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
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds after the load before the last RSS reading")
    args = parser.parse_args()
    server = None if args.url else start_server(args.checkpoint)
    if server is not None:
        print(f"server started here: --checkpoint {args.checkpoint} --device cpu "
              f"{' '.join(SERVER_FLAGS)}")
    try:
        run(args.url or server.url, args.seconds, args.clients, args.settle, args.warm_up)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
