"""The resumable embedding run of ``cryolens embed``: each batch written as a part file as soon
as it is done, parts merged into the output at the end.

Each batch is written as a part file under ``<output>.parts/``; a run that stops (killed,
Ctrl-C, a crash) continues where it stopped when the same command is run again, and the parts
are merged into the output at the end; a run that ends before any batch is done leaves no
``.parts`` (and one without parts is discarded). The inputs are fingerprinted (each file's
path, size and modification time, and every particle listed): a finished output or unfinished
parts of inputs that changed since (a file added, removed or rewritten) is an error that says
so, and ``overwrite`` starts again.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cryolens.cliutil import plural
from cryolens.compute import Compute
from cryolens.embtable import FORMATS, batch_table, write_parquet
from cryolens.errors import InputError
from cryolens.io import ParticleRecord, ParticleSet

STATE = "state.json"


def embed(particles: ParticleSet, compute: Compute, out: str | Path, *, identity: dict,
          metadata: dict, batch_size: int = 32, prefetch: int = 2, progress: bool = True,
          overwrite: bool = False, after_batch: Callable[[int], None] | None = None,
          results: Callable[[set[str]], Iterator[tuple[list[ParticleRecord], dict]]] | None
          = None, began: float | None = None) -> dict:
    """Embed every particle of ``particles`` not yet done into ``out`` (see the module
    docstring). ``after_batch(n_done)`` is called after each part is safely on disk.
    ``results(done_keys)``, when given, yields computed ``(records, arrays)`` batches in any
    order instead of this function reading and computing them (:mod:`cryolens.batch` runs
    them on a Ray cluster); parts, resuming and the output are the same. ``began``: the
    ``time.perf_counter()`` when the caller began (loading a model, listing particles), so
    that the summary's time is the whole wall time; by default, when this call began."""
    from tqdm import tqdm

    out = Path(out)
    identity = json.loads(json.dumps(identity))  # as it reads back from disk (tuples -> lists)
    parts = out.with_name(out.name + ".parts")
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        out.unlink(missing_ok=True)
    inputs = particles.fingerprint()
    if out.exists() and not parts.exists():
        return _already_complete(out, identity, inputs, len(particles))
    done = _resume(parts, identity, inputs, particles)
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
        from cryolens.h5layout import write_h5

        write_h5(table, out, meta)
    shutil.rmtree(parts)
    edges = int(np.asarray(table["edge"]).sum())
    rate = computed / seconds if seconds > 0 else float("nan")
    wall = time.perf_counter() - (began if began is not None else started)
    setup = f", {started - began:.1f} s of it starting, loading the model and listing the " \
        "particles" \
        if began is not None else ""
    resumed = f" ({len(done)} done before, resumed)" if done else ""
    n_skipped = len(particles.skipped)
    skipped = f" {plural(n_skipped, 'unreadable file')} skipped;" if n_skipped else ""
    line = (f"embedded {plural(computed, 'particle')} in {wall:.1f} s{setup} "
            f"({rate:.1f} particles/s){resumed}; {plural(edges, 'edge box', 'edge boxes')} "
            f"padded;{skipped} wrote {out}")
    return {"n": computed, "seconds": seconds, "wall_seconds": wall, "rate": rate, "todo": todo,
            "line": line, "edges": edges}



def _already_complete(out: Path, identity: dict, inputs: dict, n: int) -> dict:
    """The answer when ``out`` is finished and no parts are left: done already when it was
    made by this model from these inputs, else an :class:`InputError` saying what differs."""
    finished = _finished_meta(out)
    if finished.get("identity") == identity:
        then = finished.get("inputs") or {"particles": finished.get("n_particles")}
        if then == inputs or ("sha256" not in then and then["particles"] == n):
            return {"n": 0, "line": f"{out} is already complete ({then['particles']} "
                                    "particles); --overwrite recomputes it"}
        raise InputError(f"{out} was made from these sources, but {_changes(then, inputs)}; "
                         "use --overwrite to embed them again", field="output")
    raise InputError(f"{out} exists and was made from other inputs or another model; "
                     "use --overwrite to replace it, or another -o", field="output")


def _resume(parts: Path, identity: dict, inputs: dict, particles: ParticleSet) -> set[str]:
    """The keys of the particles already embedded in ``parts`` by an unfinished run of this
    model on these inputs (refused otherwise); a fresh ``parts`` folder when there is none."""
    import pyarrow.parquet as pq

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
    return done


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


__all__ = ["embed"]
