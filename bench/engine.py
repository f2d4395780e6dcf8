"""Engine throughput: particles/s for features and reconstruction by batch size, and peak RSS.

Run: python bench/engine.py [--device cpu|cuda] [--checkpoint PATH] [--models v001 demo]
         [--threads 1 N] [--batches 1 8 32 128] [--input numpy|tensor] [--max-chunk N]
         [--memory-budget BYTES] [--compare OLD.py]
         [--variant cudnn-benchmark|channels-last|compile|cublas-render|ieee-render] [--kernels N]
By default it measures the v001 architecture (../shared/parity/v001_random_lightning.ckpt;
skipped with a message where absent) and the shipped demo model, each at 1 and N threads on a
CPU (N: the cores this process may use). For every model and thread count it prints the
float32 matrix-product rate measured there and then (torch, 2048^2, those threads), the FLOPs
of one reconstruction and one embedding (matrix products and convolutions, by
torch.utils.flop_counter, with the dense render), the dense ceiling (that rate / those FLOPs)
and the share of it each reconstruct rate reaches. Prints a numpy float32 matmul rate last, as
this machine's yardstick. ``--input tensor`` hands
the engine torch tensors already on its device (no host round trip). On CUDA it also profiles
one reconstruct call per batch: the share of its wall time the GPU was busy (union of kernel
and copy intervals, torch.profiler) and the host<->device copy rate. ``--compare OLD.py``
loads another engine module (e.g. ``git show e55c00d:src/cryolens/engine.py > /tmp/old.py``)
and measures both, alternating, on the same model and data: "new" is src/cryolens/engine.py.
``--variant`` tries a change the engine does not make (yet) on "new": cuDNN's autotuner, the
encoder in channels-last layout, torch.compile of the encoder and decoder stages, or a GPU
render other than the default (cuBLAS planes, or the fused kernel in plain float32); ``--kernels
N`` lists the profile's N most expensive CUDA kernels (where the GPU's time goes).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import torch

from cryolens import heap
from cryolens.engine import Engine
from cryolens.model import CryoLensVAE, render


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9


def torch_sgemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-product rate on ``device`` (a CPU: torch's current threads), the
    ceiling's yardstick (on CUDA in full float32, as the engine computes)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.rand(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ a
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        sync()
        return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def dense_flops(model) -> tuple[float, float]:
    """FLOPs (matrix products and convolutions) of one reconstruction (encoder, splats, the
    dense separable render of the final convolution's region; the FFT is not counted) and of
    one embedding, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.randn(1, *(model.config.box_size,) * 3, device=device)
    # grad mode: the renderer's dense product (inference on a CPU skips its zeros)
    with torch.enable_grad(), FlopCounterMode(display=False) as embed:
        model.encode(x)
    with torch.enable_grad(), FlopCounterMode(display=False) as recon:
        enc = model.encode(x)
        model.decoder(enc.mu, *model.identity_pose(1, device))
    return float(recon.get_total_flops()), float(embed.get_total_flops())


def default_thread_counts(device: str) -> list[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return sorted({1, cores or 1}) if device == "cpu" else [torch.get_num_threads()]


def load_models(args) -> list[tuple[str, torch.nn.Module]]:
    """(label, model) for --checkpoint, or for each of --models that is available here."""
    from cryolens.checkpoints import load_model

    if args.checkpoint:
        return [(args.checkpoint, load_model(args.checkpoint, device="cpu")[0])]
    models = []
    for name in args.models:
        if name == "v001":
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "shared", "parity", "v001_random_lightning.ckpt")
            path = os.environ.get("CRYOLENS_V001", path)
            if not os.path.exists(path):
                print(f"skipping v001: no checkpoint at {os.path.normpath(path)} (set "
                      "CRYOLENS_V001, or pass --checkpoint)")
                continue
            models.append(("v001 architecture (seeded random weights)",
                           load_model(path, device="cpu")[0]))
        elif name == "random":
            torch.manual_seed(0)
            models.append(("v001 architecture, torch default init", CryoLensVAE()))
        else:
            models.append((name, load_model(name, device="cpu")[0]))
    return models


def rate(fn, volumes, min_time: float = 2.0, sync=lambda: None) -> float:
    fn(volumes)  # warm-up
    sync()
    done, start = 0, time.perf_counter()
    while True:
        fn(volumes)
        sync()
        done += len(volumes)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return done / elapsed


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_engine_class(path: str):
    """The Engine class of an engine module stored at ``path``, imported under another name."""
    spec = importlib.util.spec_from_file_location("engine_under_comparison", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module.Engine


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


VARIANTS = ("cudnn-benchmark", "channels-last", "compile", "cublas-render", "ieee-render")


def apply_variant(engine, variant: str) -> None:
    """Change ``engine`` in place for one experiment of the GPU check (issue #13)."""
    if variant == "cudnn-benchmark":  # autotuned convolution algorithms for each input shape
        torch.backends.cudnn.benchmark = True
    elif variant == "channels-last":  # NDHWC encoder weights, so cuDNN picks NDHWC kernels
        engine.model.encoder.to(memory_format=torch.channels_last_3d)
    elif variant in ("cublas-render", "ieee-render"):  # not the fused kernel's default
        render.GPU_RENDER = variant.split("-")[0]  # (module-wide: every engine in the process)
    elif variant == "compile":  # each stage the engine calls, fused where inductor can
        model, decoder = engine.model, engine.model.decoder
        model.encode = torch.compile(model.encode, dynamic=False)
        for stage in ("splats", "render", "final_convolution"):
            setattr(decoder, stage, torch.compile(getattr(decoder, stage), dynamic=False))


def top_kernels(events, count: int) -> list[str]:
    """The ``count`` CUDA kernels (and copies) with the most device time, one line each."""
    totals: dict[str, list[float]] = {}
    for event in events:
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.end - event.time_range.start
        entry[1] += 1
    whole = sum(t for t, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [f"{100 * t / whole:5.1f}% {t / 1e3:8.2f} ms {n:>5}x  {name[:110]}"
            for name, (t, n) in ranked]


def gpu_profile(fn, volumes, bytes_moved: int, kernels: int = 0) -> str:
    """One call under torch.profiler: GPU busy share of wall time, copy GB/s, and optionally
    the ``kernels`` most expensive device kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn(volumes)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn(volumes)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in device])
    copies = [(e.time_range.start, e.time_range.end) for e in device if "memcpy" in e.name.lower()]
    copy_us = _union_us(copies)
    copy_rate = f"{bytes_moved / copy_us / 1e3:.1f} GB/s while copying" if copy_us else "no copies"
    summary = (f"GPU busy {100 * busy / wall_us:.0f}% of {wall_us / 1e3:.1f} ms wall "
               f"({len(device)} device events); host<->device {bytes_moved / 1e9:.2f} GB, "
               f"{copy_rate}, {bytes_moved / wall_us / 1e3:.1f} GB/s over the call")
    return "\n         ".join([summary, *top_kernels(device, kernels)])


def measure(args, label: str, model) -> None:
    """The throughput table of one model on torch's current thread count."""
    options = {k: v for k, v in [("max_chunk", args.max_chunk),
                                 ("memory_budget", args.memory_budget)] if v is not None}
    if args.exact_zscore:
        options["exact_zscore"] = True
    engines = {"new": Engine(model, device=args.device, **options)}
    if args.variant:
        apply_variant(engines["new"], args.variant)
    if args.compare:
        engines["old"] = load_engine_class(args.compare)(model, device=args.device, **options)
    engine = engines["new"]
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = engine.config
    recon_flops, embed_flops = dense_flops(engine.model)
    sgemm = torch_sgemm_gflops(engine.device)
    ceiling = sgemm * 1e9 / recon_flops
    print(f"\n== {label}, threads {torch.get_num_threads()}")
    print(f"model: latent {cfg.latent_dims}, splats {cfg.n_affinity}+{cfg.n_free}, "
          f"box {cfg.box_size}, device {engine.device}, input {args.input}, "
          f"max_chunk {engine.max_chunk}, memory_budget {engine.memory_budget / 1024**2:.0f} MiB, "
          f"exact_zscore {engine.exact_zscore}, variant {args.variant or 'none'}")
    where = "CUDA" if cuda else f"{torch.get_num_threads()} threads"
    print(f"sgemm {sgemm:.0f} GFLOP/s (torch float32 2048^2, {where}); "
          f"FLOPs per reconstruction {recon_flops / 1e9:.3f} G, per embedding "
          f"{embed_flops / 1e9:.3f} G; dense ceiling {ceiling:.0f} reconstructions/s")
    print(f"{'engine':>6} {'batch':>5} {'features/s':>11} {'reconstruct/s':>14} "
          f"{'recon+segments/s':>17} {'peak RSS MB':>12} {'recon % ceiling':>16}")
    rng = np.random.default_rng(0)
    profiled = []
    for batch in args.batches:
        volumes = rng.standard_normal((batch, *engine.box_shape), dtype=np.float32)
        if args.input == "tensor":
            volumes = torch.from_numpy(volumes).to(engine.device)
        best: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in engines}
        for _ in range(args.rounds if args.compare else 1):
            for name, e in engines.items():
                calls = [e.features, e.reconstruct]
                if not args.no_segments:
                    calls.append(lambda v, e=e: e.reconstruct(v, segments=True))
                for i, call in enumerate(calls):
                    best[name][i] = max(best[name][i], rate(call, volumes, args.min_time, sync))
        for name, (f, r, s) in best.items():
            print(f"{name:>6} {batch:>5} {f:>11.1f} {r:>14.1f} {s:>17.1f} {peak_rss_mb():>12.0f} "
                  f"{100 * r / ceiling:>15.1f}%", flush=True)
        profiled.append(batch)
    # Profiles after every rate: tracing CUDA may leave each later launch dearer for the rest of
    # the process (on an H200, batch 32 measured after a profile of batch 1 ran at half the rate
    # of another engine's batch 32 measured before any profile), which would cut small batches.
    for batch in profiled if cuda else []:
        volumes = rng.standard_normal((batch, *engine.box_shape), dtype=np.float32)
        if args.input == "tensor":
            volumes = torch.from_numpy(volumes).to(engine.device)
        moved = 0 if args.input == "tensor" else 2 * volumes.nbytes
        try:
            profile = gpu_profile(engine.reconstruct, volumes, moved, args.kernels)
            print(f"batch {batch:>5} reconstruct profile: {profile}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a profiler quirk must not cost the figures
            print(f"batch {batch:>5} reconstruct profile failed: {type(exc).__name__}: {exc}")
    if cuda:
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 1024**2:.0f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default=None,
                        help="one model to measure (default: each of --models)")
    parser.add_argument("--models", nargs="+", default=["v001", "demo"],
                        help="v001 (../shared/parity's checkpoint), random (the v001 "
                        "architecture, torch's default init), or checkpoint names")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (default: 1 and all cores on a CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--input", choices=["numpy", "tensor"], default="numpy")
    parser.add_argument("--max-chunk", type=int, default=None)
    parser.add_argument("--memory-budget", type=int, default=None)
    parser.add_argument("--exact-zscore", action="store_true",
                        help="z-score with numpy on the host")
    parser.add_argument("--compare", default=None, metavar="OLD.py")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    parser.add_argument("--no-segments", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="an experiment applied to the engine under test (see above)")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="on CUDA: list the N kernels with the most device time")
    parser.add_argument("--default-heap", action="store_true",
                        help="leave glibc's malloc thresholds as they are (no cryolens.heap.tune)")
    args = parser.parse_args(argv)
    tuned = False if args.default_heap else heap.tune()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {sys.version.split()[0]}, heap {'tuned' if tuned else 'glibc defaults'}")
    for label, model in load_models(args):
        for threads in args.threads or default_thread_counts(args.device):
            torch.set_num_threads(threads)
            measure(args, label, model)
    # Last: its 16 MiB arrays, once freed, raise glibc's own thresholds for the rest of the
    # process, which would hide what --default-heap is there to show.
    print(f"numpy float32 matmul (the machine's yardstick): {matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
