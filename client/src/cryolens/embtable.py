"""The embeddings table of ``cryolens embed``: one Arrow table per batch, and the Parquet file
it ends in (plain numeric columns; the model's facts in the key-value metadata) read back.

Columns: the source columns of :class:`cryolens.io.ParticleRecord` (``source``, ``index``,
``run``, ``object``, ``x_angstrom`` ... ``z_voxel``, ``edge``, ...), ``particle_key``, then
``embedding_0`` .. ``embedding_{k-1}`` (float32), ``pose_w`` .. ``pose_z`` (float32, unit
quaternion) and ``global_weight`` (float32, the raw logit). Columns whose name starts with ``_``
(the raw pose and log-variance) are kept for the HDF5 layout (:mod:`cryolens.h5layout`) and
left out of Parquet. The metadata: ``cryolens`` (JSON: checkpoint name and sha256, latent and
affinity dims, voxel size, box size, server, the inputs) and ``checkpoint_name`` /
``checkpoint_sha256``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cryolens.embcolumns import METADATA_KEYS, embedding_columns
from cryolens.errors import InputError
from cryolens.io import RECORD_COLUMNS, ParticleRecord

#: Output formats by suffix.
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}


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


def metadata_of(table) -> dict:
    """The ``cryolens`` metadata of an embeddings table (empty when it has none)."""
    return json.loads((table.schema.metadata or {}).get(b"cryolens", b"{}"))


def read_table(path: Path):
    """The embeddings in ``path``, Parquet or HDF5 (by its suffix), as one Arrow table with
    the Parquet file's columns and key-value metadata."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: map reads the Parquet (.parquet) and HDF5 (.h5) files "
                         "`cryolens embed` writes", field="embeddings")
    if kind == "hdf5":
        from cryolens.h5layout import read_h5

        return read_h5(path)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}",
                         field="embeddings") from exc


def with_labels(table, path: str | Path, where: str = "the embeddings"):
    """``table`` with the columns of the CSV file ``path`` added, its metadata kept, and the
    names of the added columns.

    The CSV's first column names a column of ``table`` (``source``, ``particle_key``, ``run``,
    ``index``, ...) and rows are matched on it as text; a ``source`` value without a folder also
    matches by file name (``p012.mrc`` matches ``particles/p012.mrc``). A particle without a row
    gets None. A column whose every value is a number becomes numbers."""
    import csv

    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", field="labels") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV file: {exc}", field="labels") from None
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    header = [name.strip() for name in header]
    if len(header) < 2 or not rows:
        raise InputError(f"{path}: needs a header line and rows of at least two columns: the "
                         "column to match on (e.g. source) and a label", field="labels")
    key = header[0]
    if key not in table.column_names:
        raise InputError(f"{path}: its first column, {key!r}, is not a column of {where}; name "
                         "the column to match on first: source, particle_key, run or index",
                         field="labels")
    given = {row[0].strip(): row[1:] for row in rows if row}
    ours = ["" if v is None else str(v) for v in table[key].to_pylist()]

    def lookup(value: str):
        if value in given:
            return given[value]
        if key == "source":  # the CSV may name files without their folder
            return given.get(Path(value).name)
        return None

    found = [lookup(value) for value in ours]
    if not any(row is not None for row in found):
        raise InputError(f"{path}: none of its {len(given)} {key} values matches a particle of "
                         f"{where} (the CSV has {next(iter(given))!r}, the embeddings "
                         f"{ours[0]!r})", field="labels")
    added = []
    for j, name in enumerate(header[1:]):
        if name in table.column_names:
            raise InputError(f"{path}: column {name!r} is already in {where}; rename it",
                             field="labels")
        values = [None if row is None or j >= len(row) or not row[j].strip() else row[j].strip()
                  for row in found]
        table = table.append_column(name, _typed(values))
        added.append(name)
    return table, added


def _typed(values: list[str | None]):
    """Text as an Arrow column: numbers when every value present is one."""
    import pyarrow as pa

    try:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    except ValueError:
        return pa.array(values, pa.string())


__all__ = ["FORMATS", "METADATA_KEYS", "batch_table", "embedding_columns", "metadata_of",
           "read_table", "with_labels", "write_parquet"]
