"""A selection of rows carried out of the explorer: as CSV, as a Parquet subset of the table
(its columns and key-value metadata kept), or as copick picks of a chosen object under a new
user and session in the copick project the rows were embedded from.

Picks are written with copick's own API, all or nothing: every check (rows from one project,
the object, the names, picks not there yet, the project writable) is made before the first
pick is written, and picks written before a failure are deleted again.
"""
from __future__ import annotations

import io
import json
import re
import uuid

import numpy as np

from cryolens.errors import InputError
from cryolens.explore.errors import AlreadyExists, NotWritable
from cryolens.explore.table import EmbeddingTable

#: Column that says which row of the explored table each exported row was.
ROW_COLUMN = "table_row"
#: copick user and session ids: copick turns other characters (and "_") into "-" in file names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
POSITION_COLUMNS = ("x_angstrom", "y_angstrom", "z_angstrom")


def subset(table: EmbeddingTable, rows: np.ndarray):
    """The rows as an Arrow table: ``table_row`` first, then every column of the table, with
    the table's key-value metadata and a ``cryolens_explore`` entry naming where they came
    from."""
    import pyarrow as pa

    out = table.arrow.take(pa.array(rows, pa.int64()))
    out = out.add_column(0, ROW_COLUMN, pa.array(rows, pa.int64()))
    meta = dict(table.arrow.schema.metadata or {})
    meta[b"cryolens_explore"] = json.dumps({"table": table.path.name,
                                            "rows": len(rows)}).encode()
    return out.replace_schema_metadata(meta)


def csv_bytes(table: EmbeddingTable, rows: np.ndarray) -> bytes:
    import pyarrow.csv as pcsv

    out = io.BytesIO()
    pcsv.write_csv(subset(table, rows), out)
    return out.getvalue()


def parquet_bytes(table: EmbeddingTable, rows: np.ndarray) -> bytes:
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(subset(table, rows), out)
    return out.getvalue()


def check_name(value: str, field: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InputError(f"{field} must be 1-64 letters, digits, '.' or '-' (copick turns "
                         f"'_' and other characters into '-'), not {value!r}", field=field)
    return value


def copick_project(table: EmbeddingTable) -> str | None:
    """The copick configuration the table's rows came from, when they all came from one."""
    if "format" not in table.arrow.column_names or "source" not in table.arrow.column_names:
        return None
    import pyarrow.compute as pc

    picks = table.arrow.filter(pc.equal(table.arrow["format"], "copick"))
    sources = pc.unique(picks["source"]).to_pylist() if picks.num_rows else []
    return sources[0] if len(sources) == 1 else None


def copick_objects(config: str) -> list[str]:
    import copick

    return [o.name for o in copick.from_file(config).pickable_objects]


def write_picks(table: EmbeddingTable, rows: np.ndarray, object_name: str, user_id: str,
                session_id: str) -> dict:
    """Write each selected row's particle centre (full position, angstrom) as a pick of
    ``object_name`` by ``user_id`` in ``session_id``, one picks file per run; returns what was
    written: ``config``, ``object``, ``user_id``, ``session_id``, ``runs`` {run: picks} and
    ``picks``."""
    check_name(user_id, "user_id")
    check_name(session_id, "session_id")
    needed = ("format", "source", "run", *POSITION_COLUMNS)
    missing = [c for c in needed if c not in table.arrow.column_names]
    if missing:
        raise InputError(f"the table has no {', '.join(missing)} column: its rows are not "
                         "copick picks", field="rows")
    values = table.arrow.select(list(needed)).take(rows).to_pydict()
    for i, kind in enumerate(values["format"]):
        if kind != "copick" or values["run"][i] is None:
            raise InputError(f"row {int(rows[i])} was not embedded from a copick project "
                             f"(its source is {values['source'][i]}); copick picks can be "
                             "written only for rows from one", field="rows")
    configs = sorted(set(values["source"]))
    if len(configs) > 1:
        raise InputError(f"the rows come from {len(configs)} copick projects ({configs[0]}, "
                         f"{configs[1]}, ...); select rows of one", field="rows")
    config = configs[0]
    import copick

    try:
        root = copick.from_file(config)
    except Exception as exc:
        raise NotWritable(f"{config}: cannot open the copick project: {exc}",
                          field="rows") from exc
    objects = [o.name for o in root.pickable_objects]
    if object_name not in objects:
        raise InputError(f"no object {object_name!r} in {config}; objects: "
                         f"{', '.join(objects)}", field="object")
    positions = np.column_stack([np.asarray(values[c], np.float64) for c in POSITION_COLUMNS])
    runs: dict[str, np.ndarray] = {}
    names = np.asarray(values["run"], dtype=object)
    for name in sorted(set(values["run"])):
        runs[name] = positions[names == name]
    handles = {}
    for name in runs:
        run = root.get_run(name)
        if run is None:
            raise InputError(f"{config} has no run {name!r} now", field="rows")
        if run.get_picks(object_name=object_name, user_id=user_id, session_id=session_id):
            raise AlreadyExists(f"run {name} already has picks of {object_name} by {user_id} "
                                f"in session {session_id}; choose another session",
                                field="session_id")
        _check_writable(run, config)
        handles[name] = run
    written = []
    try:
        for name, points in runs.items():
            picks = handles[name].new_picks(object_name, session_id, user_id)
            written.append(picks)
            picks.from_numpy(points, np.tile(np.eye(4), (len(points), 1, 1)))
    except Exception as exc:
        for picks in written:
            try:
                picks.delete()
            except Exception:  # noqa: BLE001, S110 - deleting what may never have been stored
                pass
        raise NotWritable(f"{config}: writing the picks failed ({exc}); nothing was written",
                          field="rows") from exc
    return {"config": config, "object": object_name, "user_id": user_id,
            "session_id": session_id, "runs": {k: len(v) for k, v in runs.items()},
            "picks": len(rows)}


def _check_writable(run, config: str) -> None:
    """A :class:`NotWritable` unless a file can be made (and removed) where the run's picks go:
    copick's overlay, ``<overlay>/ExperimentRuns/<run>/Picks/``."""
    fs, base = getattr(run, "fs_overlay", None), getattr(run, "overlay_path", None)
    if fs is None or base is None:
        return  # not a file-system backend: its own errors are caught while writing
    directory = f"{base}/Picks"
    probe = f"{directory}/.cryolens-probe-{uuid.uuid4().hex}"
    made = False
    try:
        made = not fs.exists(directory)
        fs.makedirs(directory, exist_ok=True)
        with fs.open(probe, "w") as handle:
            handle.write("")
        fs.rm(probe)
    except Exception as exc:
        if made:
            try:
                fs.rmdir(directory)
            except Exception:  # noqa: BLE001, S110 - it may never have been made
                pass
        raise NotWritable(f"{config}: the copick project cannot be written at {directory} "
                          f"({type(exc).__name__}: {exc}); nothing was written",
                          field="rows") from exc


__all__ = ["ROW_COLUMN", "copick_objects", "copick_project", "csv_bytes", "parquet_bytes",
           "subset", "write_picks"]
