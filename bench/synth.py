"""Particles per second of the synthetic cryo-ET simulator (cryolens.synth), default settings.

Run single-threaded for the one-core figure:
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/synth.py
"""
from __future__ import annotations

import argparse
import time

import _path  # noqa: F401 - before any third-party import: see bench/_path.py

from cryolens.synth import ParticleSimulator, load_structures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="particles per timed run")
    parser.add_argument("--batch", type=int, default=64, help="particles per sample() call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    structures = load_structures()
    sim = ParticleSimulator(structures, seed=0)
    sim.sample(8)  # warm up: masks, caches, FFT plans
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        done = 0
        while done < args.n:
            done += len(sim.sample(min(args.batch, args.n - done)).labels)
        rates.append(done / (time.perf_counter() - start))
    print(f"structures: {len(structures)}; batch {args.batch}; {args.n} particles per run")
    print(f"particles/s: best {max(rates):.1f}, median {sorted(rates)[len(rates) // 2]:.1f}")

    # Cost grows with the number of points: the spread shows the big complexes' price.
    per = {}
    for idx, s in enumerate(structures):
        start = time.perf_counter()
        sim.sample(32, labels=[idx] * 32)
        per[s.name] = 32 / (time.perf_counter() - start)
    print("per structure (particles/s): "
          + ", ".join(f"{s.name} {per[s.name]:.0f} ({len(s.coords)} pts)" for s in structures))


if __name__ == "__main__":
    main()
