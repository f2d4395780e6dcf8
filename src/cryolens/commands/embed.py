"""``cryolens embed SOURCE... -o embeddings.parquet``: one row per particle with its source,
embedding (latent mean), pose (unit quaternion w, x, y, z) and global weight.

Output formats, chosen by the suffix of ``-o``:

- ``.parquet`` (default): plain numeric columns, readable as numbers by pandas, polars or any
  Arrow reader: the source columns of :class:`cryolens.io.ParticleRecord` (``source``,
  ``index``, ``run``, ``object``, ``x_angstrom`` ... ``z_voxel``, ``edge``, ...), then
  ``embedding_0`` .. ``embedding_{k-1}`` (float32), ``pose_w``, ``pose_x``, ``pose_y``,
  ``pose_z`` (float32) and ``global_weight`` (float32, the raw logit). The checkpoint's name
  and sha256 and the inputs are in the file's key-value metadata (``cryolens`` JSON, and
  ``checkpoint_name`` / ``checkpoint_sha256``).
- ``.h5``: the layout of CryoLens's own ``extract_copick_embeddings`` script, one group per run
  (``particles`` for inputs that are not copick runs) with ``embeddings`` (N, k), ``log_var``
  (N, k), ``pose`` (N, 4) the raw pose head (angle, axis) as CryoLens writes it (a server
  gives quaternions only: then ``pose`` holds those, and the group's ``pose_convention``
  attribute says so), ``pose_quaternion`` (N, 4, w, x, y, z), ``global_weight`` (N, 1),
  ``coordinates_angstrom`` and ``coordinates_voxel`` (N, 3; x, y, z; voxels rounded),
  ``structure_labels``, ``session_ids``, ``user_ids``, ``voxel_spacings``, ``orientations``
  (identity: the picks' rotations are not read), plus ``edge``, ``sources`` and ``indices``;
  and a ``metadata`` group with the checkpoint's name and sha256.

Resumable: each batch is written as a part file under ``<output>.parts/`` as soon as it is
done; a run that stops (killed, Ctrl-C, a crash) continues where it stopped when the same
command is run again, and the parts are merged into the output at the end; a run that ends
before any batch is done leaves no ``.parts`` (and one without parts is discarded). The inputs are
fingerprinted (each file's path, size and modification time, and every particle listed): a
finished output or unfinished parts of inputs that changed since (a file added, removed or
rewritten) is an error that says so, and ``--overwrite`` starts again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cryolens.commands._common import (
    SOURCES_HELP,
    add_engine_options,
    add_input_options,
    add_progress_option,
    copick_options,
    load_engine,
    open_from_args,
    read_options,
    skipped_note,
    table_options,
)
from cryolens.errors import InputError
from cryolens.io import RECORD_COLUMNS, ParticleRecord, ParticleSet

#: Arrays a compute function returns for a batch (n leading): embedding (n, k), pose (n, 4)
#: unit quaternion w, x, y, z, global_weight (n,); pose_axis_angle (n, 4) when known.
Compute = Callable[[np.ndarray], dict[str, np.ndarray]]
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}
STATE = "state.json"


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "embed", parents=[common], description=__doc__.split("\n\n")[0],
        help="embed your particles: one row per particle (Parquet or HDF5)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="embeddings.parquet (plain numeric columns) or embeddings.h5 (CryoLens's "
                        "copick-embedding layout) (required)")
    add_input_options(p)
    add_engine_options(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="compute on a running CryoLens server instead of in-process "
                        "(default: in-process)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: discard an existing output and unfinished parts "
                        "(default: off, resume)")
    add_progress_option(p)
    from cryolens.batch import add_ray_options

    add_ray_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix.lower() not in FORMATS:
        raise InputError(f"{out}: the output must end in .parquet or .h5", field="output")
    dims: dict[str, int] = {}
    if args.server:
        compute, checkpoint = server_compute(args.server)
        box = 48
    else:
        engine = load_engine(args)
        compute, checkpoint = engine_compute(engine), engine.checkpoint
        box = engine.config.box_size
        dims = {"latent_dims": engine.config.latent_dims,
                "affinity_dims": engine.config.affinity_dims}
    particles = open_from_args(args, box=box)
    identity = {
        "sources": [str(Path(s).resolve()) for s in args.sources],
        "read": asdict(read_options(args)),
        "copick": asdict(copick_options(args)),
        "checkpoint_sha256": getattr(checkpoint, "sha256", None),
        "server": args.server,
    }
    if args.tomograms is not None or args.coordinate_pixel_size is not None:
        identity["tables"] = {**asdict(table_options(args)), "tomograms": str(
            Path(args.tomograms).resolve()) if args.tomograms is not None else None}
    metadata = {
        "checkpoint_name": getattr(checkpoint, "display_name", None) or
        getattr(checkpoint, "name", None),
        "checkpoint_sha256": getattr(checkpoint, "sha256", None),
        "server": args.server,
        "box_size": box,
        **dims,
    }
    results = None
    if getattr(args, "ray", False):  # read and compute on a Ray cluster (cryolens.batch)
        if args.server:
            raise InputError("--ray computes on a Ray cluster and --server on a server: "
                             "choose one", field="ray")
        if args.tomograms is not None:
            raise InputError("--ray does not read particle tables yet; embed them without --ray",
                             field="ray")
        from cryolens.batch import ray_results

        results = ray_results(particles, args)
    try:
        summary = embed(particles, compute, out, identity=identity, metadata=metadata,
                        batch_size=args.batch_size, progress=not args.quiet,
                        overwrite=args.overwrite, results=results)
    finally:
        particles.close()
    print(summary["line"])
    return 0


# -- compute --------------------------------------------------------------------------------
def engine_compute(engine) -> Compute:
    """Features through :func:`cryolens.operations.run`, as every front end computes them."""
    from cryolens.operations import Operation
    from cryolens.operations import run as run_operation

    operation = Operation(kind="features")

    def compute(particles: np.ndarray) -> dict[str, np.ndarray]:
        return run_operation(engine, operation, particles).arrays

    return compute


def server_compute(url: str):
    """Features from a CryoLens server through :class:`cryolens.client.CryoLensClient`."""
    try:
        from cryolens.client import CryoLensClient
    except ImportError as exc:
        raise InputError(f"--server needs cryolens.client, which this install lacks ({exc})",
                         field="server") from exc
    client = CryoLensClient(url)
    info = None
    for name in ("model_info", "info"):
        method = getattr(client, name, None)
        if callable(method):
            try:
                info = method()
                break
            except Exception:  # noqa: BLE001 - the name and hash are a courtesy, not required
                info = None

    class Remote:
        name = display_name = (info or {}).get("checkpoint") or f"server {url}"
        sha256 = (info or {}).get("sha256") or (info or {}).get("checkpoint_sha256")

    def compute(particles: np.ndarray) -> dict[str, np.ndarray]:
        got = client.extract_features(particles)
        return {key: np.asarray(got[key]) for key in ("embedding", "pose", "global_weight")}

    return compute, Remote()


# -- tables ---------------------------------------------------------------------------------
def _record_schema():
    import pyarrow as pa

    types = {"index": pa.int64(), "voxel_size": pa.float64(), "edge": pa.bool_(),
             "padded_fraction": pa.float64(), "rescaled": pa.bool_()}
    for name in ("origin_x", "origin_y", "origin_z", "x_angstrom", "y_angstrom", "z_angstrom"):
        types[name] = pa.float64()
    for name in ("x_voxel", "y_voxel", "z_voxel"):
        types[name] = pa.int64()
    return [(name, types.get(name, pa.string())) for name in RECORD_COLUMNS]


def batch_table(records: list[ParticleRecord], arrays: dict[str, np.ndarray]):
    """One Arrow table: the records' columns, ``particle_key``, then the numbers."""
    import pyarrow as pa

    columns, names = [], []
    for name, kind in _record_schema():
        columns.append(pa.array([getattr(r, name) for r in records], type=kind))
        names.append(name)
    columns.append(pa.array([r.key for r in records], type=pa.string()))
    names.append("particle_key")
    embedding = np.asarray(arrays["embedding"], np.float32)
    for k in range(embedding.shape[1]):
        columns.append(pa.array(embedding[:, k]))
        names.append(f"embedding_{k}")
    pose = np.asarray(arrays["pose"], np.float32).reshape(len(records), 4)
    for k, axis in enumerate("wxyz"):
        columns.append(pa.array(pose[:, k]))
        names.append(f"pose_{axis}")
    columns.append(pa.array(np.asarray(arrays["global_weight"], np.float32).reshape(-1)))
    names.append("global_weight")
    # kept for the HDF5 layout; the Parquet file drops columns whose name starts with _
    if "pose_axis_angle" in arrays:
        raw = np.asarray(arrays["pose_axis_angle"], np.float32)
        for k in range(4):
            columns.append(pa.array(raw[:, k]))
            names.append(f"_pose_axis_angle_{k}")
    if "log_variance" in arrays:
        log_var = np.asarray(arrays["log_variance"], np.float32)
        for k in range(log_var.shape[1]):
            columns.append(pa.array(log_var[:, k]))
            names.append(f"_log_var_{k}")
    return pa.Table.from_arrays(columns, names=names)


def embedding_columns(names) -> list[str]:
    found = [n for n in names if n.startswith("embedding_") and n[10:].isdigit()]
    return sorted(found, key=lambda n: int(n[10:]))


# -- the resumable loop -----------------------------------------------------------------------
def embed(particles: ParticleSet, compute: Compute, out: str | Path, *, identity: dict,
          metadata: dict, batch_size: int = 32, prefetch: int = 2, progress: bool = True,
          overwrite: bool = False, after_batch: Callable[[int], None] | None = None,
          results: Callable[[set[str]], Iterator[tuple[list[ParticleRecord], dict]]] | None
          = None) -> dict:
    """Embed every particle of ``particles`` not yet done into ``out`` (see the module
    docstring). ``after_batch(n_done)`` is called after each part is safely on disk.
    ``results(done_keys)``, when given, yields computed ``(records, arrays)`` batches in any
    order instead of this function reading and computing them (:mod:`cryolens.batch` runs
    them on a Ray cluster); parts, resuming and the output are the same."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out)
    identity = json.loads(json.dumps(identity))  # as it reads back from disk (tuples -> lists)
    parts = out.with_name(out.name + ".parts")
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        out.unlink(missing_ok=True)
    inputs = particles.fingerprint()
    if out.exists() and not parts.exists():
        finished = _finished_meta(out)
        if finished.get("identity") == identity:
            then = finished.get("inputs") or {"particles": finished.get("n_particles")}
            if then == inputs or ("sha256" not in then and then["particles"] == len(particles)):
                return {"n": 0, "line": f"{out} is already complete ({then['particles']} "
                                        "particles); --overwrite recomputes it"}
            raise InputError(f"{out} was made from these sources, but {_changes(then, inputs)}; "
                             "use --overwrite to embed them again", field="output")
        raise InputError(f"{out} exists and was made from other inputs or another model; "
                         "use --overwrite to replace it, or another -o", field="output")
    done: set[str] = set()
    if parts.exists() and not any(parts.glob("part-*.parquet")):
        shutil.rmtree(parts)  # a run that wrote no particles: nothing to resume
    if parts.exists():
        state = json.loads((parts / STATE).read_text()) if (parts / STATE).exists() else {}
        if state.get("identity") != identity:
            raise InputError(f"{parts} holds an unfinished run with other inputs or another "
                             "model; use --overwrite to discard it", field="output")
        for part in sorted(parts.glob("part-*.parquet")):
            done.update(pq.read_table(part, columns=["particle_key"])["particle_key"]
                        .to_pylist())
        gone = sorted(done - {record.key for record in particles.records})
        if gone:
            raise InputError(f"{parts} holds {len(gone)} particle(s) no longer among the inputs "
                             f"(first: {_describe_key(gone[0])}): an input was removed or changed "
                             "since; use --overwrite to start again", field="output")
        then = state.get("inputs", inputs)  # parts from before inputs were recorded: keys only
        if then != inputs:
            raise InputError(f"{parts} holds an unfinished run of these sources, but "
                             f"{_changes(then, inputs)}; use --overwrite to start again",
                             field="output")
    else:
        parts.mkdir(parents=True)
        _atomic_write(parts / STATE, json.dumps({"identity": identity,
                                                 "inputs": inputs}).encode())
    number = len(list(parts.glob("part-*.parquet")))
    todo = len(particles) - len(done)
    started = time.perf_counter()
    computed = 0
    bar = tqdm(total=len(particles), initial=len(done), unit="particle", disable=not progress,
               desc="embed", file=sys.stderr)
    try:
        if results is None:
            batches = ((b.records, compute(b.particles))
                       for b in particles.batches(batch_size, skip=done, prefetch=prefetch))
        else:
            batches = results(done)
        for records, arrays in batches:
            table = batch_table(records, arrays)
            _write_part(parts / f"part-{number:06d}.parquet", table)
            number += 1
            computed += len(records)
            bar.update(len(records))
            if after_batch is not None:
                after_batch(computed)
        bar.close()
        seconds = time.perf_counter() - started
        table = _merge(parts, particles)
    except BaseException:
        if not any(parts.glob("part-*.parquet")):  # nothing done: leave nothing behind
            shutil.rmtree(parts, ignore_errors=True)
        raise
    finally:
        bar.close()
    if table.num_rows != len(particles):
        raise RuntimeError(f"{table.num_rows} rows for {len(particles)} particles")
    meta = {**metadata, "n_particles": table.num_rows, "identity": identity, "inputs": inputs,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "columns": "embedding_i: latent mean; pose_w..z: unit quaternion; global_weight: "
                       "raw logit"}
    if FORMATS[out.suffix.lower()] == "parquet":
        write_parquet(table, out, meta)
    else:
        write_h5(table, out, meta)
    shutil.rmtree(parts)
    edges = int(np.asarray(table["edge"]).sum())
    rate = computed / seconds if seconds > 0 else float("nan")
    resumed = f" ({len(done)} done before, resumed)" if done else ""
    line = (f"embedded {computed} particles in {seconds:.1f} s ({rate:.1f} particles/s)"
            f"{resumed}; {edges} edge boxes padded;{skipped_note(particles)} wrote {out}")
    return {"n": computed, "seconds": seconds, "rate": rate, "todo": todo, "line": line,
            "edges": edges}


def _write_part(path: Path, table) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _merge(parts: Path, particles: ParticleSet):
    """Every part, in the order the particles were listed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    if not tables:
        raise InputError("no particles to embed", field="source")
    table = pa.concat_tables(tables)
    order = {r.key: i for i, r in enumerate(particles.records)}
    keys = table["particle_key"].to_pylist()
    stray = next((k for k in keys if k not in order), None)
    if stray is not None:
        raise InputError(f"{parts} holds {_describe_key(stray)}, which is not among the inputs; "
                         "use --overwrite to start again", field="output")
    position = pa.array([order[k] for k in keys], pa.int64())
    return table.take(pc.sort_indices(position))


def _finished_meta(out: Path) -> dict:
    """The ``cryolens`` metadata of a finished output (empty when it has none)."""
    try:
        if FORMATS[out.suffix.lower()] == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(out).metadata or {}
            return json.loads(meta.get(b"cryolens", b"{}"))
        import h5py

        with h5py.File(out, "r") as f:
            return json.loads(f["metadata"].attrs.get("cryolens", "{}"))
    except Exception:  # noqa: BLE001 - an unreadable output is simply not ours
        return {}


def _describe_key(key: str) -> str:
    """A particle key in words: ``file particle i``, or the copick fields as they are."""
    fields = key.split("|")
    return f"{fields[0]} particle {fields[1]}" if len(fields) == 2 else key


def _changes(then: dict, now: dict) -> str:
    """How the inputs differ from when an output or its parts were made, in words."""
    if then.get("particles") != now["particles"]:
        return (f"they held {then.get('particles')} particles then and hold "
                f"{now['particles']} now")
    return ("their files changed since (the same number of particles, but other contents or "
            "modification times)")


def write_parquet(table, out: Path, meta: dict) -> None:
    import pyarrow.parquet as pq

    keep = [n for n in table.column_names if not n.startswith("_")]
    table = table.select(keep)
    schema_meta = {b"cryolens": json.dumps(meta).encode(),
                   b"checkpoint_name": str(meta.get("checkpoint_name")).encode(),
                   b"checkpoint_sha256": str(meta.get("checkpoint_sha256")).encode()}
    table = table.replace_schema_metadata(schema_meta)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)


def write_h5(table, out: Path, meta: dict) -> None:
    """CryoLens's copick-embedding layout (see the module docstring)."""
    import h5py

    def col(name):
        return table[name].to_numpy(zero_copy_only=False)

    runs = col("run")
    groups = np.array(["particles" if r is None else str(r) for r in runs], dtype=object)
    emb = np.column_stack([col(n) for n in embedding_columns(table.column_names)])
    quat = np.column_stack([col(f"pose_{a}") for a in "wxyz"]).astype(np.float32)
    raw_names = [f"_pose_axis_angle_{k}" for k in range(4)]
    has_raw = raw_names[0] in table.column_names
    raw = np.column_stack([col(n) for n in raw_names]).astype(np.float32) if has_raw else quat
    var_names = sorted((n for n in table.column_names if n.startswith("_log_var_")),
                       key=lambda n: int(n[9:]))
    log_var = np.column_stack([col(n) for n in var_names]).astype(np.float32) \
        if var_names else None
    weight = col("global_weight").astype(np.float32)

    def floats(names):
        values = [np.array([np.nan if v is None else v for v in col(n)], np.float64)
                  for n in names]
        return np.column_stack(values).astype(np.float32)

    tmp = out.with_name(out.name + ".tmp")
    labels = sorted(set(groups))
    counts: dict[str, int] = {}
    with h5py.File(tmp, "w") as f:
        for label in labels:
            rows = np.flatnonzero(groups == label)
            g = f.create_group(label)

            def strings(name, rows=rows):
                return np.array(["" if v is None else str(v) for v in col(name)[rows]], dtype="S")

            objects = strings("object")
            for obj in objects:
                counts[obj.decode()] = counts.get(obj.decode(), 0) + 1
            g.create_dataset("structure_labels", data=objects)
            g.create_dataset("embeddings", data=emb[rows].astype(np.float32), compression="gzip")
            if log_var is not None:
                g.create_dataset("log_var", data=log_var[rows], compression="gzip")
            g.create_dataset("pose", data=raw[rows], compression="gzip")
            g.attrs["pose_convention"] = "axis_angle" if has_raw else "quaternion_wxyz"
            g.create_dataset("pose_quaternion", data=quat[rows], compression="gzip")
            g.create_dataset("global_weight", data=weight[rows, None], compression="gzip")
            g.create_dataset("coordinates_angstrom",
                             data=floats(["x_angstrom", "y_angstrom", "z_angstrom"])[rows])
            g.create_dataset("coordinates_voxel",
                             data=floats(["x_voxel", "y_voxel", "z_voxel"])[rows])
            g.create_dataset("orientations", data=np.tile(np.eye(3, dtype=np.float32),
                                                          (len(rows), 1, 1)), compression="gzip")
            g.create_dataset("voxel_spacings", data=floats(["voxel_size"])[rows, 0])
            g.create_dataset("session_ids", data=strings("session_id"))
            g.create_dataset("user_ids", data=strings("user_id"))
            g.create_dataset("edge", data=col("edge")[rows].astype(bool))
            g.create_dataset("sources", data=strings("source"))
            g.create_dataset("indices", data=col("index")[rows].astype(np.int64))
            g.attrs["n_particles"] = len(rows)
        m = f.create_group("metadata")
        m.attrs["checkpoint_path"] = str(meta.get("checkpoint_name"))
        m.attrs["checkpoint_name"] = str(meta.get("checkpoint_name"))
        m.attrs["checkpoint_sha256"] = str(meta.get("checkpoint_sha256"))
        m.attrs["box_size"] = int(meta.get("box_size") or 48)
        m.attrs["normalization_method"] = "z-score"
        m.attrs["total_particles"] = int(table.num_rows)
        m.attrs["runs_processed"] = len([x for x in labels if x != "particles"])
        m.attrs["target_voxel_spacing"] = float(meta.get("identity", {}).get("copick", {})
                                                .get("voxel_spacing", 10.0))
        m.attrs["extraction_date"] = str(meta.get("created"))
        m.attrs["cryolens"] = json.dumps(meta)
        names = sorted(counts)
        m.create_dataset("structures", data=np.array(names, dtype="S"))
        m.create_dataset("structure_counts", data=np.array([counts[n] for n in names], np.int32))
    os.replace(tmp, out)


__all__ = ["batch_table", "embed", "embedding_columns", "engine_compute",
           "server_compute", "write_h5", "write_parquet"]
