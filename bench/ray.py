"""The plain server against Ray Serve, and ``cryolens embed`` against ``cryolens embed --ray``,
on this machine.

Run: python bench/ray.py [--checkpoint demo] [--seconds 15] [--rounds 3] [--clients 16]
     [--particles 2048] [--skip-serve] [--skip-data] [--ray-env RAY_SERVE_ENABLE_HA_PROXY=1]

1. HTTP: the same load against ``cryolens-server`` (uvicorn, one worker) and against
   ``cryolens serve --ray`` (a local one-node Ray cluster, one replica with every CPU):
   ``--clients`` threads, each posting one 48^3 particle as .npy to ``/extract_features`` and
   asking for .npz, as fast as answers come, for ``--seconds`` after a short warm-up, taking
   turns ``--rounds`` times (both servers stay up, so both see the same machine). Prints
   requests/s, p50/p99 latency, errors, the CPU time all the server's processes spent per
   request (Ray's GCS, raylet, proxy and controller included) and their summed RSS.
2. Embedding: ``--particles`` simulated particles in one .npy, embedded in-process and with
   ``--ray`` (which starts and stops its own local cluster; its wall time includes that),
   particles/s for both, and whether the rows are the same (within 1e-6).

Each server and each Ray cluster runs in its own process group and temp dir; only those are
stopped. Prints the load average, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import free_port, stop_on_sigterm

from cryolens import formats

BIN = Path(sys.executable).parent
WARM_UP_S = 5.0
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: str) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # from field 3 (state) on


def _started(pid: int) -> str | None:
    try:
        return _stat(str(pid))[19]  # field 22: start time
    except (OSError, IndexError):
        return None


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's workers run in sessions of their own, so a
    process group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(entry)[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_usage(root: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of ``root`` and its descendants."""
    cpu, rss = 0.0, 0
    for pid in tree(root):
        try:
            fields = _stat(str(pid))
            cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return cpu, rss / 2**20


class Server:
    """A server command in its own process group; ``stop()`` signals its leader, then the
    group."""

    def __init__(self, args: list[str], port: int, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-ray-", suffix=".log",  # noqa: SIM115
                                               delete=False)
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text()[-3000:])
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout} s")

    def stop(self) -> None:
        family = [(pid, _started(pid)) for pid in tree(self.process.pid)]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of this group still there
        except ProcessLookupError:
            pass
        self.process.wait(10)
        for pid, started in family[1:]:  # descendants that outlived their parent
            if started is not None and _started(pid) == started:  # still that very process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        Path(self.log.name).unlink(missing_ok=True)


def load(url: str, pid: int, seconds: float, clients: int) -> dict:
    volume = np.random.default_rng(0).standard_normal((48, 48, 48)).astype(np.float32)
    body = formats.write_npy(volume)
    headers = {"Content-Type": formats.NPY_MEDIA_TYPE, "Accept": formats.NPZ_MEDIA_TYPE}
    stop = threading.Event()
    t0 = time.monotonic()
    timed_from, end = t0 + WARM_UP_S, t0 + WARM_UP_S + seconds
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = session.post(url + "/extract_features", data=body, headers=headers,
                                      timeout=120)
                status = str(answer.status_code)
                ok = answer.status_code == 200 and answer.content[:2] == b"PK"
            except requests.RequestException as exc:
                status, ok = type(exc).__name__, False
            finished = time.monotonic()
            if timed_from <= started and finished <= end:
                with lock:
                    if ok:
                        latencies.append(finished - started)
                    else:
                        errors[status] = errors.get(status, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, timed_from - time.monotonic()))
    cpu_before, _ = tree_usage(pid)
    time.sleep(max(0.0, end - time.monotonic()))
    cpu_after, rss = tree_usage(pid)
    stop.set()
    for thread in threads:
        thread.join(130)
    n = len(latencies)
    return {"n": n, "rps": n / seconds, "p50": np.percentile(latencies, 50) * 1000 if n else
            float("nan"), "p99": np.percentile(latencies, 99) * 1000 if n else float("nan"),
            "errors": errors, "cpu_ms": (cpu_after - cpu_before) * 1000 / max(n, 1),
            "rss": rss}


def bench_serve(args) -> None:
    """Both servers up at once; the load goes to each in turn, ``--rounds`` times, so that
    both see the same machine (its other users come and go)."""
    common = ["-c", args.checkpoint, "--device", "cpu", "--host", "127.0.0.1",
              "--log-level", "warning"]
    cpus = os.cpu_count() or 1
    ray_tmp = tempfile.mkdtemp(prefix="bray", dir="/tmp")
    ray_env = {"RAY_TMPDIR": ray_tmp, **dict(item.split("=", 1) for item in args.ray_env)}
    if ray_env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # its files in our temp dir, not /tmp
        ray_env.update({"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{ray_tmp}/hap/haproxy.cfg",
                        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{ray_tmp}/hap/admin.sock",
                        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": f"{ray_tmp}/hap",
                        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{ray_tmp}/hap/state"})
    extra_env = " +" + ",".join(args.ray_env) if args.ray_env else ""
    runs = [("uvicorn (cryolens-server)", [str(BIN / "cryolens-server"), *common], {}),
            (f"Ray Serve (1 replica, {cpus} CPUs){extra_env}",
             [str(BIN / "cryolens"), "serve", *common, "--ray", "--replica-cpus", str(cpus)],
             ray_env)]
    shared = Path("/tmp/haproxy-serve")  # Ray still puts a per-node folder here
    before = set(shared.iterdir()) if shared.is_dir() else set()
    servers, ready = {}, {}
    results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    try:
        for name, command, env in runs:
            port = free_port()
            started = time.monotonic()
            servers[name] = Server([*command, "--port", str(port)], port, env)
            servers[name].wait_ready()
            ready[name] = time.monotonic() - started
        for _ in range(args.rounds):
            for name, server in servers.items():
                results[name].append(load(server.url, server.process.pid, args.seconds,
                                          args.clients))
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if shared.is_dir():
            for path in set(shared.iterdir()) - before:  # only what this run created
                shutil.rmtree(path, ignore_errors=True)
            if not before:
                shutil.rmtree(shared, ignore_errors=True)
    print(f"\nHTTP: {args.clients} clients, .npy -> .npz /extract_features, {args.rounds} x "
          f"{args.seconds:g} s timed per server, alternating, checkpoint {args.checkpoint} "
          "(medians of the rounds; both servers resident throughout)")
    print(f"{'server':34} {'ready s':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU-ms/req':>10} {'RSS MiB':>8}  errors")
    medians = {}
    for name, rounds in results.items():
        m = {key: float(np.median([r[key] for r in rounds]))
             for key in ("rps", "p50", "p99", "cpu_ms", "rss")}
        errors = sum(sum(r["errors"].values()) for r in rounds)
        medians[name] = m
        print(f"{name[:34]:34} {ready[name]:7.1f} {m['rps']:7.1f} {m['p50']:7.1f} "
              f"{m['p99']:7.1f} {m['cpu_ms']:10.1f} {m['rss']:8.0f}  {errors or 'none'}")
    plain, ray = (results[name] for name, _, _ in runs)
    ratios = [r["rps"] / p["rps"] for p, r in zip(plain, ray, strict=True)]
    print(f"Ray Serve / uvicorn throughput per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {np.median(ratios):.2f} (target >= 0.50)")


def bench_data(args) -> None:
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="bench-ray-data-"))
    try:
        rng = np.random.default_rng(0)
        stack = rng.standard_normal((args.particles, 48, 48, 48), dtype=np.float32)
        np.save(work / "particles.npy", stack)
        del stack
        common = [str(work / "particles.npy"), "-c", args.checkpoint, "--device", "cpu",
                  "--quiet", "--overwrite"]
        times = {}
        lines = {}
        for name, extra, env in (
                ("in-process", [], {}),
                ("--ray (local cluster)", ["--ray"],
                 {"RAY_TMPDIR": str(work / "ray")})):
            out = work / f"{'ray' if extra else 'local'}.parquet"
            started = time.monotonic()
            done = subprocess.run([str(BIN / "cryolens"), "embed", *common, "-o", str(out),
                                   *extra], check=False, capture_output=True, text=True,
                                  env={**os.environ, **env}, timeout=1800,
                                  start_new_session=True)
            times[name] = time.monotonic() - started
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            lines[name] = done.stdout.strip().splitlines()[-1]
            steady = re.search(r"^ray: .*$", done.stderr, re.MULTILINE)
            if steady:
                lines[name + " steady"] = steady.group(0)
        a, b = pq.read_table(work / "local.parquet"), pq.read_table(work / "ray.parquet")
        worst = 0.0
        same = a.schema.names == b.schema.names and a.num_rows == b.num_rows
        for column in a.schema.names:
            x = a[column].to_numpy(zero_copy_only=False)
            y = b[column].to_numpy(zero_copy_only=False)
            if x.dtype.kind == "f":
                x, y = x.astype(np.float64), y.astype(np.float64)
                same = same and bool(np.array_equal(np.isnan(x), np.isnan(y)))
                both = ~np.isnan(x)
                if both.any():
                    worst = max(worst, float(np.max(np.abs(x[both] - y[both]))))
            else:
                same = same and list(x) == list(y)
        print(f"\nEmbedding {args.particles} particles (.npy), checkpoint {args.checkpoint}")
        for name, seconds in times.items():
            rate = re.search(r"\(([\d.]+) particles/s\)", lines[name])
            print(f"{name:24} wall {seconds:6.1f} s (process start, model load"
                  f"{', cluster start' if 'ray' in name else ''} included); command's own line: "
                  f"{rate.group(1) if rate else '?'} particles/s")
        for name, line in lines.items():
            if name.endswith(" steady"):
                print(f"  {line}")
        print(f"rows identical (within 1e-6): {same and worst <= 1e-6} (largest difference "
              f"{worst:.2e})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    stop_on_sigterm()  # servers started below are stopped on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--ray-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the Ray Serve run (repeatable), "
                             "e.g. RAY_SERVE_ENABLE_HA_PROXY=1")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    if not args.skip_serve:
        bench_serve(args)
    if not args.skip_data:
        bench_data(args)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
