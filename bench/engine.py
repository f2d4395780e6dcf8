"""Engine throughput: particles/s for features and reconstruction by batch size, and peak RSS.

Run: python bench/engine.py [--device cpu|cuda] [--checkpoint PATH] [--batches 1 8 32 128]
Prints a numpy float32 matmul rate first, as this machine's yardstick.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from cryolens.engine import Engine
from cryolens.model import CryoLensVAE


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9


def rate(fn, volumes: np.ndarray, min_time: float = 2.0, sync=lambda: None) -> float:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default=None, help="default: v001 architecture, random weights")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    print(f"numpy float32 matmul: {matmul_gflops():.0f} GFLOP/s")
    if args.checkpoint:
        engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    else:
        torch.manual_seed(0)
        engine = Engine(CryoLensVAE(), device=args.device)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    cfg = engine.config
    print(f"model: latent {cfg.latent_dims}, splats {cfg.n_affinity}+{cfg.n_free}, box {cfg.box_size}, "
          f"device {engine.device}")
    print(f"{'batch':>5} {'features/s':>11} {'reconstruct/s':>14} {'recon+segments/s':>17} {'peak RSS MB':>12}")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        volumes = rng.standard_normal((batch, *engine.box_shape), dtype=np.float32)
        f = rate(engine.features, volumes, args.min_time, sync)
        r = rate(engine.reconstruct, volumes, args.min_time, sync)
        s = rate(lambda v: engine.reconstruct(v, segments=True), volumes, args.min_time, sync)
        print(f"{batch:>5} {f:>11.1f} {r:>14.1f} {s:>17.1f} {peak_rss_mb():>12.0f}", flush=True)
    if engine.device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 1024**2:.0f} MB")


if __name__ == "__main__":
    main()
