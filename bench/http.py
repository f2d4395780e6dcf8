"""The server against the engine it wraps, in one run on the same volumes: how much of the engine's
rate reaches an HTTP client, per format, and against LitServe wrapping the same engine.

Run: python bench/http.py [--checkpoint demo] [--device cpu] [--seconds 8] [--rounds 4]
                          [--no-litserve]

Prints, each with its fraction of the in-process engine's rate at the same batch size:
  engine in-process (the ceiling): reconstruct at 1, 32 and 128, features at 1 and 16;
  single /reconstruct with the documented defaults (segments on), JSON and binary: p50, p95;
  binary /batch_process (reconstruct) of 32, 64 and 128 particles: particles/s, taking turns
  with the in-process engine over --rounds rounds;
  binary single-volume /extract_features from 1 and 16 concurrent clients: requests/s, the
  two taking turns over --rounds rounds, with 16 clients as a multiple of one;
  the same load against LitServe (dynamic batching: max_batch_size 32,
  batch_timeout 10 ms, .npy in a multipart field), if ``litserve`` is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import orjson
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import ServerProcess, free_port, stop_on_sigterm

from cryolens import formats, heap

NPY = {"Content-Type": "application/x-npy", "Accept": "application/x-npz"}
LITSERVE_APP = Path(__file__).with_name("litserve_app.py")


class Client:
    """One keep-alive HTTP client (urllib3, what ``requests`` runs on). It reads each answer
    in one call: ``requests``' ``.content`` reads in 10 KB pieces, which for a 14 MB answer
    costs the client ~30 ms of Python and would be charged to the server measured here."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool = urllib3.PoolManager(maxsize=1, retries=False)

    def post(self, path: str, body: bytes | None = None, headers: dict | None = None,
             fields: dict | None = None) -> urllib3.BaseHTTPResponse:
        return self.pool.request("POST", self.url + path, body=body, headers=headers,
                                 fields=fields, timeout=120)


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off for a block. While orjson builds the ~7,000 lists of three
    volumes, collections triggered by those allocations walk every object of this process
    (torch's included): ~30 % of decoding a segmented reconstruction's JSON."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def rate(fn, n: int, seconds: float) -> float:
    """Items per second of ``fn`` (which handles ``n`` items), over at least ``seconds``."""
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += n
    return done / (time.perf_counter() - start)


def latencies(fn, count: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def concurrent_rate(make_call, clients: int, seconds: float) -> tuple[float, int]:
    """Requests per second of ``clients`` threads, each calling its own ``make_call()``; the
    clock starts once every thread has connected and sent one request (not counted)."""
    counts, errors = [0] * clients, [0] * clients
    clock: dict[str, float] = {}

    def start_clock() -> None:  # run by the last thread to reach the barrier
        clock["start"] = time.perf_counter()
        clock["stop"] = clock["start"] + seconds

    ready = threading.Barrier(clients, action=start_clock)

    def loop(i: int) -> None:
        call = make_call()
        try:
            call()  # warm-up: connects
        finally:  # even if it failed, so that the others do not wait for this thread
            ready.wait(timeout=120)
        while time.perf_counter() < clock["stop"]:
            if call():
                counts[i] += 1
            else:
                errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - clock["start"]), sum(errors)


def alternating_rates(make_call, seconds: float, rounds: int) -> dict:
    """Requests per second of 1 and of 16 concurrent clients, measured in turn over ``rounds``
    rounds (``seconds`` in all for each): this machine's speed drifts by tens of percent from
    one minute to the next, and the 16-client figure is judged against the 1-client one, so
    the two are taken side by side rather than minutes apart. Errors count in the result's
    ``errors`` entry."""
    out: dict = {1: [], 16: [], "errors": 0}
    for _ in range(rounds):
        for clients in (1, 16):
            measured, errors = concurrent_rate(make_call, clients, seconds / rounds)
            out[clients].append(measured)
            out["errors"] += errors
    return out


def client_rows(label: str, rates: dict) -> None:
    """Rows for :func:`alternating_rates`: the medians, and the 16-client figure as a multiple
    of one client's (the median of the rounds' own ratios)."""
    one, many = statistics.median(rates[1]), statistics.median(rates[16])
    ratio = statistics.median(b / a for a, b in zip(rates[1], rates[16], strict=True))
    errors = f" ({rates['errors']} errors)" if rates["errors"] else ""
    line(f"{label}, 1 client: requests/s", f"{one:.1f}{errors}",
         "features@1", one)
    line(f"{label}, 16 clients: requests/s", f"{many:.1f} ({ratio:.2f}x 1)",
         "features@16", many)


def engine_rates(engine, volumes: np.ndarray, seconds: float) -> dict[str, float]:
    from cryolens.operations import Operation, run

    feats = Operation("features")
    out = {}
    for n in (1, 32, 128):
        out[f"reconstruct@{n}"] = rate(reconstruct_call(engine, volumes[:n]), n, seconds)
    for n in (1, 16):
        out[f"features@{n}"] = rate(lambda n=n: run(engine, feats, volumes[:n]), n, seconds)
    out["reconstruct-segments@1"] = rate(
        lambda: run(engine, Operation("reconstruct", segments=True), volumes[:1]), 1, seconds)
    return out


def reconstruct_call(engine, volumes: np.ndarray):
    from cryolens.operations import Operation, run

    operation = Operation("reconstruct")
    return lambda: run(engine, operation, volumes)


def paired_rate(server_call, engine_call, n: int, seconds: float, rounds: int
                ) -> tuple[float, float]:
    """The server's rate of ``n`` particles per call and its share of the in-process engine's,
    the two measured in turn over ``rounds`` rounds (``seconds`` in all for each) so that
    both see the machine at the same speed: (median rate, median of the rounds' shares)."""
    rates, shares = [], []
    for _ in range(rounds):
        ceiling = rate(engine_call, n, seconds / rounds)
        rates.append(rate(server_call, n, seconds / rounds))
        shares.append(rates[-1] / ceiling)
    return statistics.median(rates), statistics.median(shares)


ROWS: list[tuple[str, str, str | None, float | None, float | None]] = []


def line(name: str, value: str, ceiling: str | None = None, measured: float | None = None,
         share: float | None = None) -> None:
    """A result row; ``ceiling`` names the engine rate it is compared with when printed, or
    ``share`` is that fraction, measured beside the engine (:func:`paired_rate`)."""
    ROWS.append((name, value, ceiling, measured, share))


def print_rows(engine: dict[str, float]) -> None:
    for name, value, ceiling, measured, share in ROWS:
        if name.endswith(":") and not value:
            print(name)
            continue
        if share is not None:
            note = f"  ({share:5.1%} of the engine, taking turns with it)"
        elif ceiling:
            note = f"  ({measured / engine[ceiling]:5.1%} of the engine)"
        else:
            note = ""
        print(f"  {name:<52} {value:>18}{note}")
    ROWS.clear()


def bench_server(url: str, engine, volumes: np.ndarray, seconds: float, count: int,
                 rounds: int) -> None:
    one = volumes[0]
    # The client's own JSON work is kept small, as a client that cares would: the body is
    # encoded once (it is the same particle each time), and answers are decoded with orjson
    # with the garbage collector paused.
    as_json = orjson.dumps({"input_volume": one, "use_segmented_decoder": True,
                            "use_final_convolution": True}, option=orjson.OPT_SERIALIZE_NUMPY)
    client = Client(url)

    def post_json():
        response = client.post("/reconstruct", as_json, {"Content-Type": "application/json"})
        with gc_paused():
            return np.asarray(orjson.loads(response.data)["reconstruction"], np.float32)

    one_npy = formats.write_npy(one)

    def post_npy():
        return formats.read_npz(client.post("/reconstruct", one_npy, NPY).data)["reconstruction"]

    p50, p95 = latencies(post_json, count)
    line("JSON /reconstruct (segments on): p50 / p95", f"{p50 * 1e3:.1f} / {p95 * 1e3:.1f} ms",
         "reconstruct-segments@1", 1 / p50)
    p50, p95 = latencies(post_npy, count)
    line("binary /reconstruct (segments on): p50 / p95",
         f"{p50 * 1e3:.1f} / {p95 * 1e3:.1f} ms", "reconstruct-segments@1", 1 / p50)
    for n in (32, 64, 128):
        body = formats.write_npy(volumes[:n])

        def batch(body=body):
            response = client.post("/batch_process", body, NPY)
            assert response.status == 200, response.data[:500]
            return formats.read_npz(response.data)

        measured, share = paired_rate(batch, reconstruct_call(engine, volumes[:n]), n,
                                      seconds, rounds)
        line(f"binary /batch_process of {n}: particles/s", f"{measured:.1f}", share=share)
    rates = alternating_rates(lambda: _features_call(url, one_npy), seconds, rounds)
    client_rows("binary /extract_features", rates)


def _features_call(url: str, body: bytes):
    client = Client(url)

    def call() -> bool:
        response = client.post("/extract_features", body, NPY)
        if response.status != 200:
            return False  # counted as an error; its body is no .npz
        formats.read_npz(response.data)
        return True

    return call


def bench_litserve(checkpoint: str, device: str, volumes: np.ndarray, seconds: float,
                   rounds: int) -> None:
    port = free_port()
    proc = ServerProcess([sys.executable, str(LITSERVE_APP), "--port", str(port),
                          "--checkpoint", checkpoint, "--device", device], port)
    try:
        proc.wait_healthy(120, path="/health")
        buffer = io.BytesIO()
        np.save(buffer, volumes[0])
        body = buffer.getvalue()

        def make_call():
            client = Client(proc.url)

            def call() -> bool:
                response = client.post("/predict", fields={"file": ("particle.npy", body)})
                if response.status != 200:
                    return False
                orjson.loads(response.data)
                return True

            return call

        client_rows("LitServe batched /predict", alternating_rates(make_call, seconds, rounds))
    finally:
        proc.stop()


def main(argv=None) -> None:
    stop_on_sigterm()  # servers started below are stopped on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo", help="model to serve (default: demo)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="duration of each throughput measurement (default: 8)")
    parser.add_argument("--count", type=int, default=40,
                        help="requests per latency measurement (default: 40)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds in which 1 and 16 clients take turns, and /batch_process "
                             "with the engine (default: 4)")
    parser.add_argument("--no-litserve", action="store_true", help="skip the LitServe run")
    args = parser.parse_args(argv)
    heap.tune()  # as the server and the cryolens command do: the ceiling on equal terms

    volumes = np.random.default_rng(0).standard_normal((128, 48, 48, 48)).astype(np.float32)
    print(f"bench/http.py: checkpoint {args.checkpoint}, device {args.device}, "
          f"{os.cpu_count()} CPUs")
    # The ceiling is measured before and after the servers run and the better of the two is
    # used, so a machine that gets busier or quieter mid-run does not flatter the servers;
    # /batch_process takes turns with the engine instead (paired_rate).
    from cryolens.engine import Engine

    engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    before = engine_rates(engine, volumes, args.seconds)
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cryolens.server.minimal_cryolens_server",
                          "--checkpoint", args.checkpoint, "--device", args.device,
                          "--host", "127.0.0.1", "--port", str(port), "--log-level",
                          "warning"], port)
    try:
        proc.wait_healthy(120)
        line("cryolens server (uvicorn, one process):", "")
        bench_server(proc.url, engine, volumes, args.seconds, args.count, args.rounds)
    finally:
        proc.stop()
    if args.no_litserve:
        pass
    elif importlib.util.find_spec("litserve") is None:
        line("LitServe: not installed (pip install litserve), skipped", "")
    else:
        line("LitServe wrapping the same engine:", "")
        bench_litserve(args.checkpoint, args.device, volumes, args.seconds, args.rounds)
    after = engine_rates(engine, volumes, args.seconds)
    ceiling = {name: max(before[name], after[name]) for name in before}
    print("engine in-process (the ceiling; before / after the servers ran):")
    for name in ceiling:
        print(f"  {name:<52} {before[name]:>8.1f} / {after[name]:.1f} /s")
    print_rows(ceiling)

if __name__ == "__main__":
    main()
