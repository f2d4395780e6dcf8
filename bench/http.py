"""The server against the engine it wraps, in one run on the same volumes: how much of the engine's
rate reaches an HTTP client, per format, and against LitServe wrapping the same engine.

Run: python bench/http.py [--checkpoint demo] [--device cpu] [--seconds 8] [--no-litserve]

Prints, each with its fraction of the in-process engine's rate at the same batch size:
  engine in-process (the ceiling): reconstruct at 1, 32 and 128, features at 1 and 16;
  single /reconstruct with the documented defaults (segments on), JSON and binary: p50, p95;
  binary /batch_process (reconstruct) of 32 and 128 particles: particles/s;
  binary single-volume /extract_features from 1 and 16 concurrent clients: requests/s;
  the same 16-client load against LitServe (dynamic batching: max_batch_size 32,
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
from server_helpers import ServerProcess, free_port

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
    """Requests per second of ``clients`` threads, each calling its own ``make_call()``."""
    stop = time.perf_counter() + seconds
    counts, errors = [0] * clients, [0] * clients

    def loop(i: int) -> None:
        call = make_call()
        call()  # warm-up, not counted
        while time.perf_counter() < stop:
            if call():
                counts[i] += 1
            else:
                errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start), sum(errors)


def engine_rates(checkpoint: str, device: str, volumes: np.ndarray, seconds: float
                 ) -> dict[str, float]:
    from cryolens.engine import Engine
    from cryolens.operations import Operation, run

    engine = Engine.from_checkpoint(checkpoint, device=device)
    rec, feats = Operation("reconstruct"), Operation("features")
    out = {}
    for n in (1, 32, 128):
        out[f"reconstruct@{n}"] = rate(lambda n=n: run(engine, rec, volumes[:n]), n, seconds)
    for n in (1, 16):
        out[f"features@{n}"] = rate(lambda n=n: run(engine, feats, volumes[:n]), n, seconds)
    out["reconstruct-segments@1"] = rate(
        lambda: run(engine, Operation("reconstruct", segments=True), volumes[:1]), 1, seconds)
    return out


ROWS: list[tuple[str, str, str | None, float | None]] = []


def line(name: str, value: str, ceiling: str | None = None, measured: float | None = None
         ) -> None:
    """A result row; ``ceiling`` names the engine rate it is compared with when printed."""
    ROWS.append((name, value, ceiling, measured))


def print_rows(engine: dict[str, float]) -> None:
    for name, value, ceiling, measured in ROWS:
        if name.endswith(":") and not value:
            print(name)
            continue
        share = f"  ({measured / engine[ceiling]:5.1%} of the engine)" if ceiling else ""
        print(f"  {name:<52} {value:>18}{share}")
    ROWS.clear()


def bench_server(url: str, volumes: np.ndarray, seconds: float, count: int) -> None:
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
    for n in (32, 128):
        body = formats.write_npy(volumes[:n])

        def batch(body=body):
            response = client.post("/batch_process", body, NPY)
            assert response.status == 200, response.data[:500]
            return formats.read_npz(response.data)

        measured = rate(batch, n, seconds)
        line(f"binary /batch_process of {n}: particles/s", f"{measured:.1f}",
             f"reconstruct@{min(n, 128)}", measured)
    for clients in (1, 16):
        measured, errors = concurrent_rate(lambda: _features_call(url, one_npy), clients,
                                           seconds)
        line(f"binary /extract_features, {clients} clients: requests/s",
             f"{measured:.1f}" + (f" ({errors} errors)" if errors else ""),
             "features@16" if clients > 1 else "features@1", measured)


def _features_call(url: str, body: bytes):
    client = Client(url)

    def call() -> bool:
        response = client.post("/extract_features", body, NPY)
        if response.status != 200:
            return False  # counted as an error; its body is no .npz
        formats.read_npz(response.data)
        return True

    return call


def bench_litserve(checkpoint: str, device: str, volumes: np.ndarray, seconds: float) -> None:
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

        for clients in (1, 16):
            measured, errors = concurrent_rate(make_call, clients, seconds)
            line(f"LitServe batched /predict, {clients} clients: requests/s",
                 f"{measured:.1f}" + (f" ({errors} errors)" if errors else ""),
                 "features@16" if clients > 1 else "features@1", measured)
    finally:
        proc.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo", help="model to serve (default: demo)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="duration of each throughput measurement (default: 8)")
    parser.add_argument("--count", type=int, default=40,
                        help="requests per latency measurement (default: 40)")
    parser.add_argument("--no-litserve", action="store_true", help="skip the LitServe run")
    args = parser.parse_args(argv)
    heap.tune()  # as the server and the cryolens command do: the ceiling on equal terms

    volumes = np.random.default_rng(0).standard_normal((128, 48, 48, 48)).astype(np.float32)
    print(f"bench/http.py: checkpoint {args.checkpoint}, device {args.device}, "
          f"{os.cpu_count()} CPUs")
    # The ceiling is measured before and after the servers run and the better of the two is
    # used, so a machine that gets busier or quieter mid-run does not flatter the servers.
    before = engine_rates(args.checkpoint, args.device, volumes, args.seconds)
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cryolens.server.minimal_cryolens_server",
                          "--checkpoint", args.checkpoint, "--device", args.device,
                          "--host", "127.0.0.1", "--port", str(port), "--log-level",
                          "warning"], port)
    try:
        proc.wait_healthy(120)
        line("cryolens server (uvicorn, one process):", "")
        bench_server(proc.url, volumes, args.seconds, args.count)
    finally:
        proc.stop()
    if args.no_litserve:
        pass
    elif importlib.util.find_spec("litserve") is None:
        line("LitServe: not installed (pip install litserve), skipped", "")
    else:
        line("LitServe wrapping the same engine:", "")
        bench_litserve(args.checkpoint, args.device, volumes, args.seconds)
    after = engine_rates(args.checkpoint, args.device, volumes, args.seconds)
    engine = {name: max(before[name], after[name]) for name in before}
    print("engine in-process (the ceiling; before / after the servers ran):")
    for name in engine:
        print(f"  {name:<52} {before[name]:>8.1f} / {after[name]:.1f} /s")
    print_rows(engine)

if __name__ == "__main__":
    main()
