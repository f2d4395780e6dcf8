"""``cryolens embed`` on particles in MRC files against the engine's own features rate.

Run: PYTHONPATH=src python bench/embed.py [--n 2000] [--batch-size 32] [--checkpoint demo]

Writes ``--n`` single-particle MRC files (simulated particles, 10 A) to a temporary folder,
then measures, on the same machine and checkpoint and at the same batch size:

1. the engine: ``operations.run(engine, Operation("features"), batch)`` over the particles
   already in memory (no I/O) - the ceiling;
2. ``cryolens embed FOLDER -o out.parquet`` in-process, end to end after the model is loaded:
   listing the files, reading them (on a background thread, overlapping the model), writing
   the resumable parts and merging them into the Parquet file;

and prints particles/s for both and the fraction (target: >= 0.70). The engine is measured
before and after the embed run, and the mean taken, since a shared machine's load drifts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--dir", default=None, help="where to write the MRC files "
                                                    "(default: a temporary folder)")
    args = parser.parse_args(argv)

    import mrcfile

    from cryolens.commands.embed import embed, engine_compute
    from cryolens.engine import Engine
    from cryolens.io import open_particles
    from cryolens.synth import ParticleSimulator

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    sim = ParticleSimulator(snr=5.0, seed=11)
    volumes = np.concatenate([sim.sample(min(200, args.n - i)).particles
                              for i in range(0, args.n, 200)])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "particles"
        folder.mkdir()
        for i, volume in enumerate(volumes):
            with mrcfile.new(folder / f"particle_{i:05d}.mrc") as mrc:
                mrc.set_data(volume)
                mrc.voxel_size = 10.0
        print(f"wrote {args.n} MRC files ({args.n * (1024 + volume.nbytes) / 1e6:.0f} MB)")

        before = engine_rate(engine, volumes, args.batch_size)
        print(f"engine features:  {before:8.1f} particles/s (in memory, batch {args.batch_size})")
        out = Path(tmp) / "embeddings.parquet"
        start = time.perf_counter()
        particles = open_particles(folder)
        summary = embed(particles, engine_compute(engine), out, identity={"bench": True},
                        metadata={}, batch_size=args.batch_size, progress=False)
        wall = time.perf_counter() - start
        particles.close()
        embed_rate = args.n / wall
        print(f"cryolens embed:   {embed_rate:8.1f} particles/s (end to end: list, read, "
              f"compute, write; loop alone {summary['rate']:.1f}/s)")
        after = engine_rate(engine, volumes, args.batch_size)
        print(f"engine features:  {after:8.1f} particles/s (again, after)")
    engine_mean = (before + after) / 2
    fraction = embed_rate / engine_mean
    print(f"fraction of the engine's rate: {fraction:.2f} (target >= 0.70); load average now "
          f"{os.getloadavg()[0]:.1f}")
    sys.exit(0 if fraction >= 0.70 else 1)


if __name__ == "__main__":
    main()
