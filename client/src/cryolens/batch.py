"""``cryolens embed --ray``: the same embedding run, read and computed on a Ray cluster.

The driver lists the particles exactly as ``cryolens embed`` does (:func:`cryolens.io.
open_particles`: headers and picks only), leaves out those already done (resuming), and cuts
the rest into chunks of one input each: an MRC file, an array file, or part of one copick
run (at most ``--chunk-size`` particles, so a large run is split across tasks). Ray Data
then

1. reads each chunk in a task of its own, which opens only that input (a copick project
   with only that run) and reads and conforms its particles with the same reader code;
2. embeds them in a pool of actors, each holding one :class:`cryolens.engine.Engine` (one
   per GPU, or ``--actor-cpus`` CPUs each; by default one CPU of the cluster is left to the
   read tasks, which would otherwise wait for the actors forever);
3. returns only the numbers (and each particle's record) to the driver, which writes the
   same part files, the same Parquet (plain numeric columns built by
   :func:`cryolens.embtable.batch_table`, never Ray's tensor extension type) or HDF5,
   and the same final ``particles/s`` line as the in-process command.

A run on a laptop and one on a cluster give the same file, and either can resume the other.
Ray is optional: ``pip install 'cryolens-server[ray]'``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from cryolens import heap
from cryolens.errors import InputError
from cryolens.io import CopickOptions, ParticleRecord, ParticleSet, ReadOptions

INSTALL_RAY = "pip install 'cryolens-server[ray]'"
DEFAULT_CHUNK = 256
#: Arrays the actors send back (the volumes stay in the cluster).
RESULT_ARRAYS = ("embedding", "pose", "global_weight", "pose_axis_angle", "log_variance")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"Ray Data (with --ray; {INSTALL_RAY})")
    group.add_argument("--ray", action="store_true",
                       help="read and embed on a Ray cluster with Ray Data; same output "
                            "(default: off, in this process)")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="an existing Ray cluster, e.g. auto or ray://head:10001 (default: "
                            "start a local one, stopped at the end)")
    group.add_argument("--actors", type=int, default=None,
                       help="engines in the actor pool (default: one per GPU, else the "
                            "cluster's CPUs less one for reading, divided by --actor-cpus)")
    group.add_argument("--actor-cpus", type=float, default=1.0,
                       help="CPUs per engine actor, also its torch threads "
                            "(default: %(default)s)")
    group.add_argument("--actor-gpus", type=float, default=None,
                       help="GPUs per engine actor (default: 1 when the cluster has GPUs and "
                            "--device is not cpu, else 0)")
    group.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                       help="most particles per read task (default: %(default)s)")


def plan(particles: ParticleSet, done: set[str], chunk_size: int) -> list[dict]:
    """Chunks of one input (file, or copick run) each, in order, without the done particles:
    ``{"source", "run", "keys"}`` (keys as JSON text)."""
    chunks: list[dict] = []
    current: tuple | None = None
    keys: list[str] = []

    def close() -> None:
        if keys:
            chunks.append({"source": current[1], "path": str(Path(current[1]).resolve()),
                           "run": current[2] or "", "keys": json.dumps(keys)})

    for reader_index, item in particles.items:
        record = particles.readers[reader_index].records[item]
        if record.key in done:
            continue
        group = (reader_index, record.source, record.run)
        if group != current or len(keys) >= chunk_size:
            close()
            current, keys = group, []
        keys.append(record.key)
    close()
    return chunks


def read_chunk(options: dict, copick: dict):
    """The read task: a chunk's particles, conformed, with their records (as JSON)."""
    read_options = ReadOptions(**options)
    copick_options = CopickOptions(**{**copick, "runs": tuple(copick["runs"])})

    def read(batch: dict) -> dict:
        from cryolens.io import open_particles

        volumes, records = [], []
        for source, path, run, keys in zip(batch["source"], batch["path"], batch["run"],
                                           batch["keys"], strict=True):
            wanted = json.loads(keys)
            picks = replace(copick_options, runs=(str(run),)) if run else copick_options
            subset = open_particles([str(path)], read_options, picks)  # absolute: any cwd
            try:
                for reader in subset.readers:  # records name the input as the driver was given it
                    reader.records = [replace(r, source=str(source)) for r in reader.records]
                where = {subset.readers[r].records[i].key: (r, i) for r, i in subset.items}
                missing = [k for k in wanted if k not in where]
                if missing:
                    raise InputError(f"{source}: {len(missing)} particle(s) listed by the "
                                     "driver are not there on this node (e.g. "
                                     f"{missing[0]}); is the input on a shared file system?",
                                     field="source")
                got = subset.read([where[k] for k in wanted])
            finally:
                subset.close()
            volumes.append(got.particles)
            records += [json.dumps(asdict(r)) for r in got.records]
        return {"particles": np.concatenate(volumes),
                "record": np.array(records, dtype=object)}

    return read


class Embedder:
    """An actor of the pool: one engine, kept for every batch it gets."""

    def __init__(self, checkpoint: str, device: str, threads: int) -> None:
        import torch

        from cryolens.compute import engine_compute
        from cryolens.engine import Engine

        torch.set_num_threads(threads)
        heap.tune()  # the actor's process runs nothing but batches (cryolens/heap.py)
        self.compute = engine_compute(Engine.from_checkpoint(checkpoint, device=device))

    def __call__(self, batch: dict) -> dict:
        arrays = self.compute(np.ascontiguousarray(batch["particles"], np.float32))
        out = {name: np.asarray(arrays[name]) for name in RESULT_ARRAYS if name in arrays}
        out["record"] = batch["record"]
        return out


def connect(address: str | None) -> bool:
    """Connect to ``address``, or start a local cluster; True when this call started it (and
    so must stop it). An already connected process (tests, notebooks) keeps its connection."""
    try:
        import ray
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Data: {INSTALL_RAY}", field="ray") from exc
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return False
    ray.init(include_dashboard=False, log_to_driver=False)
    return True


def pool_size(args: argparse.Namespace) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each) for this cluster; see ``--actors``."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    actor_gpus = args.actor_gpus
    if actor_gpus is None:
        actor_gpus = 1.0 if gpus >= 1 and str(args.device).lower() != "cpu" else 0.0
    actor_cpus = float(args.actor_cpus)
    actors = args.actors
    if actors is None:
        if actor_gpus > 0:
            actors = max(1, int(gpus // actor_gpus))
        else:
            actors = max(1, int((cpus - 1) // actor_cpus)) if actor_cpus > 0 else 1
    if actors < 1:
        raise InputError("--actors must be at least 1", field="actors")
    if actors * actor_cpus >= cpus > 1:
        raise InputError(f"{actors} actor(s) of {actor_cpus:g} CPU take all {cpus:g} CPUs of "
                         "the cluster and the read tasks would never run: use fewer --actors "
                         "or a smaller --actor-cpus", field="actors")
    return actors, actor_cpus, actor_gpus


def ray_results(particles: ParticleSet, args: argparse.Namespace):
    """For :func:`cryolens.store.embed`: ``results(done)`` yields computed
    ``(records, arrays)`` batches from the Ray cluster."""
    checkpoint = str(args.checkpoint)
    if Path(checkpoint).exists():
        checkpoint = str(Path(checkpoint).resolve())  # the same path on every node
    read_options = asdict(particles.options)
    copick = asdict(CopickOptions(object=args.object, voxel_spacing=args.voxel_spacing,
                                  runs=tuple(args.runs or ()), tomo_type=args.tomo_type,
                                  user_id=args.user_id, session_id=args.session_id))
    copick["runs"] = list(copick["runs"])
    chunk_size = max(1, int(args.chunk_size))

    def results(done: set[str]) -> Iterator[tuple[list[ParticleRecord], dict]]:
        chunks = plan(particles, done, chunk_size)
        if not chunks:
            return
        import ray

        owns = connect(args.ray_address)
        try:
            import ray.data

            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the command's own bar counts particles
            context.print_on_execution_start = False
            actors, actor_cpus, actor_gpus = pool_size(args)
            device = args.device
            if actor_gpus == 0 and str(device).lower() == "auto":
                device = "cpu"
            if not args.quiet:
                print(f"ray: {len(chunks)} read task(s), {actors} engine actor(s) of "
                      f"{actor_cpus:g} CPU / {actor_gpus:g} GPU on "
                      f"{len(ray.nodes())} node(s)", file=sys.stderr, flush=True)
            dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
            dataset = dataset.map_batches(read_chunk(read_options, copick), batch_size=1,
                                          batch_format="numpy")
            dataset = dataset.map_batches(
                Embedder, batch_size=max(1, int(args.batch_size)), batch_format="numpy",
                concurrency=actors, num_cpus=actor_cpus, num_gpus=actor_gpus,
                fn_constructor_kwargs={"checkpoint": checkpoint, "device": device,
                                       "threads": max(1, int(actor_cpus))})
            started, count = time.perf_counter(), 0
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                records = [ParticleRecord(**json.loads(text)) for text in batch["record"]]
                count += len(records)
                yield records, {name: batch[name] for name in RESULT_ARRAYS if name in batch}
            seconds = time.perf_counter() - started
            print(f"ray: {count} particles in {seconds:.1f} s once the cluster was up "
                  f"({count / max(seconds, 1e-9):.1f} particles/s; actors started and model "
                  "loaded in that time)", file=sys.stderr, flush=True)
        finally:
            if owns:
                ray.shutdown()

    return results


__all__ = ["Embedder", "add_ray_options", "connect", "plan", "pool_size", "ray_results",
           "read_chunk"]
