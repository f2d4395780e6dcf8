"""Peak memory a request costs the server, per endpoint and body format/dtype, against the
body's size: the server's peak RSS (``VmHWM``, reset before the request through
``/proc/PID/clear_refs``) above its RSS just before, divided by the body's bytes.

Run: python bench/body_memory.py [--mb 64] [--stack 64] [--only statistics]

Each case gets a fresh server (a small random model on the CPU), warmed by one small request
to the same endpoint (one volume, so the model's own first-use allocations are not counted),
then the measured request is sent once: memory kept by an earlier large request would
otherwise hide what this one needs. Linux only (``/proc``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import orjson
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import small_model_file, start_cli_server, stop_on_sigterm

from cryolens import formats

NPY = {"Content-Type": formats.NPY_MEDIA_TYPE}
OCTET = {"Content-Type": formats.MRC_MEDIA_TYPE}
JSON = {"Content-Type": "application/json"}


def rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current


def mrc_body(volume: np.ndarray) -> bytes:
    import mrcfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(volume)
        return path.read_bytes()


def cases(mb: float, n_stack: int = 64) -> list[tuple[str, str, dict, bytes]]:
    """(name, path, headers, body) for each measured request."""
    rng = np.random.default_rng(0)
    size = int(mb * 2**20)
    out = []
    for dtype in ("u1", "<i2", "<f4", "<f8"):
        count = size // np.dtype(dtype).itemsize
        values = rng.integers(0, 100, count).astype(dtype)
        out.append((f"/statistics .npy {np.dtype(dtype).name}", "/statistics", NPY,
                    formats.write_npy(values.reshape(-1, 256))))
    floats = rng.standard_normal(size // 4).astype(np.float32)
    out.append(("/statistics MRC float32", "/statistics", OCTET,
                mrc_body(floats.reshape(-1, 256, 256))))
    numbers = rng.standard_normal(int(mb * 2**20 / 20))
    out.append(("/statistics JSON", "/statistics", JSON,
                orjson.dumps({"volume": numbers}, option=orjson.OPT_SERIALIZE_NUMPY)))
    empties = max(1, int(mb * 2**20 / 4.7))  # '[], ' each: the 47 MiB for 10 million
    out.append((f"/batch_process JSON {empties} empty volumes (413)", "/batch_process", JSON,
                b'{"input_volumes": [' + b", ".join([b"[]"] * empties) + b"]}"))
    stack = rng.standard_normal((n_stack, 48, 48, 48)).astype(np.float32)
    for dtype in ("u1", "<f4"):
        body = formats.write_npy((stack * 20 + 50).astype(dtype) if dtype == "u1" else stack)
        for path in ("/batch_process", "/extract_features"):  # .npz answers, as the client
            out.append((f"{path} .npy {n_stack} x 48^3 {np.dtype(dtype).name}", path,
                        {**NPY, "Accept": formats.NPZ_MEDIA_TYPE}, body))
    return out


WARM_UP = {NPY["Content-Type"]: formats.write_npy(np.zeros((1, 48, 48, 48), np.float32)),
           JSON["Content-Type"]: b'{"volume": [1, 2]}'}


def measure(model: Path, path: str, headers: dict, body: bytes) -> tuple[int, float]:
    """(status, peak RSS growth / body size) of one request to a fresh, warmed server."""
    server = start_cli_server(model, "--max-body-bytes", str(2**30))
    try:
        pool = urllib3.PoolManager(maxsize=1, retries=False)
        kind = headers["Content-Type"]
        warm = WARM_UP.get(kind, WARM_UP[NPY["Content-Type"]])
        pool.request("POST", server.url + path, body=warm,
                     headers=headers if kind in WARM_UP else {**headers, **NPY}, timeout=120)
        pid = server.process.pid
        reset_peak(pid)
        before = rss_kib(pid, "VmRSS")
        answer = pool.request("POST", server.url + path, body=body, headers=headers,
                              timeout=600)
        growth = rss_kib(pid, "VmHWM") - before
        return answer.status, growth * 1024 / len(body)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64.0, help="size of the large bodies, MiB")
    parser.add_argument("--stack", type=int, default=64,
                        help="volumes in the model endpoints' stacks (at most 256, the server's "
                             "--max-volumes)")
    parser.add_argument("--only", default="", help="only the cases whose name holds this")
    args = parser.parse_args()
    stop_on_sigterm()
    with tempfile.TemporaryDirectory() as folder:
        model = small_model_file(Path(folder) / "small.safetensors")
        print(f"{'request':52s} {'body MiB':>9s} {'status':>6s} {'peak RSS growth':>16s}")
        for name, path, headers, body in cases(args.mb, args.stack):
            if args.only in name:
                status, ratio = measure(model, path, headers, body)
                print(f"{name:52s} {len(body) / 2**20:9.1f} {status:6d} "
                      f"{ratio * len(body) / 2**20:9.0f} MiB {ratio:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
