"""``cryolens embed`` on particles in MRC files against the engine's own features rate.

Run: PYTHONPATH=src python bench/embed.py [--n 2000] [--batch-size 32] [--checkpoint demo]

Writes ``--n`` single-particle MRC files (simulated particles, 10 A) to a temporary folder,
then measures, on the same machine and checkpoint and at the same batch size:

1. the engine: ``operations.run(engine, Operation("features"), batch)`` over the particles
   already in memory (no I/O) - the ceiling;
2. ``cryolens embed FOLDER -o out.parquet`` in-process, end to end after the model is loaded:
   listing the files, reading them (on a background thread, overlapping the model), writing
   the resumable parts and merging them into the Parquet file;

and prints particles/s for both and the fraction (target: >= 0.70). Engine and embed runs
alternate ``--rounds`` times, and medians and best-of are both given, since a shared
machine's load drifts from minute to minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401 - before any third-party import: see bench/_path.py
import numpy as np
import torch


def engine_rate(engine, volumes: np.ndarray, batch_size: int) -> float:
    from cryolens.operations import Operation, run

    operation = Operation(kind="features")
    run(engine, operation, volumes[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(volumes), batch_size):
        run(engine, operation, volumes[i:i + batch_size])
    return len(volumes) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="particles (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--checkpoint", default="demo", help="default: %(default)s")
    parser.add_argument("--device", default="cpu", help="default: %(default)s")
    parser.add_argument("--rounds", type=int, default=2,
                        help="engine, then embed, this many times (default: %(default)s)")
    parser.add_argument("--dir", default=None, help="where to write the MRC files "
                                                    "(default: a temporary folder)")
    args = parser.parse_args(argv)

    import mrcfile

    from cryolens.compute import engine_compute
    from cryolens.engine import Engine
    from cryolens.io import open_particles
    from cryolens.store import embed
    from cryolens.synth import ParticleSimulator

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    # 64 simulated particles (simulating thousands takes minutes), each file a copy with its
    # own extra noise: the content does not change the work, only the I/O must be real
    base = ParticleSimulator(snr=5.0, seed=11).sample(64).particles
    rng = np.random.default_rng(0)
    volumes = np.empty((args.n, *base.shape[1:]), np.float32)
    for i in range(args.n):
        volumes[i] = base[i % len(base)] + 0.1 * rng.standard_normal(base.shape[1:],
                                                                     dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "particles"
        folder.mkdir()
        for i, volume in enumerate(volumes):
            with mrcfile.new(folder / f"particle_{i:05d}.mrc") as mrc:
                mrc.set_data(volume)
                mrc.voxel_size = 10.0
        print(f"wrote {args.n} MRC files ({args.n * (1024 + volume.nbytes) / 1e6:.0f} MB)")

        engine_rates, embed_rates = [], []
        for round_ in range(args.rounds):
            engine_rates.append(engine_rate(engine, volumes, args.batch_size))
            print(f"round {round_ + 1}: engine features {engine_rates[-1]:7.1f} particles/s "
                  f"(in memory, batch {args.batch_size})")
            out = Path(tmp) / "embeddings.parquet"
            out.unlink(missing_ok=True)
            start = time.perf_counter()
            particles = open_particles(folder)
            summary = embed(particles, engine_compute(engine), out, identity={"bench": True},
                            metadata={}, batch_size=args.batch_size, progress=False)
            wall = time.perf_counter() - start
            particles.close()
            embed_rates.append(args.n / wall)
            print(f"round {round_ + 1}: cryolens embed  {embed_rates[-1]:7.1f} particles/s (end "
                  f"to end: list, read, compute, write; the loop alone "
                  f"{summary['rate']:.1f}/s)  load average {os.getloadavg()[0]:.1f}")
    fraction = float(np.median(embed_rates) / np.median(engine_rates))
    best = max(embed_rates) / max(engine_rates)
    print(f"fraction of the engine's rate: {fraction:.2f} median, {best:.2f} best-of "
          f"(target >= 0.70); load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          "cpus")
    sys.exit(0 if fraction >= 0.70 else 1)


if __name__ == "__main__":
    main()
