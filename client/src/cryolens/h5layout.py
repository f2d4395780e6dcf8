"""CryoLens's copick-embedding HDF5 layout (its ``extract_copick_embeddings`` script): written
from an embeddings table (:mod:`cryolens.embtable`), and read back as one.

One group per run (``particles`` for inputs that are not copick runs) with ``embeddings``
(N, k), ``log_var`` (N, k), ``pose`` (N, 4) the raw pose head (angle, axis) as CryoLens writes
it (a server gives quaternions only: then ``pose`` holds those, and the group's
``pose_convention`` attribute says so), ``pose_quaternion`` (N, 4, w, x, y, z),
``global_weight`` (N, 1), ``coordinates_angstrom`` and ``coordinates_voxel`` (N, 3, in the
column order x, y, z, as CryoLens's script writes them, unlike the z, y, x order of arrays;
voxels rounded), ``structure_labels``, ``session_ids``, ``user_ids``, ``voxel_spacings``,
``orientations`` (identity: the picks' rotations are not read), plus ``edge``, ``sources`` and
``indices``; and a ``metadata`` group with the checkpoint's name and sha256 and the
``cryolens`` JSON of the Parquet file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cryolens.embcolumns import METADATA_KEYS, embedding_columns
from cryolens.errors import InputError

#: Datasets of a run's group in the HDF5 layout and the Parquet columns each becomes (an (N, 3)
#: dataset: x, y, z). CryoLens's own script writes the first six; ``cryolens embed`` all.
H5_COLUMNS: dict[str, tuple[str, ...]] = {
    "structure_labels": ("object",),
    "user_ids": ("user_id",),
    "session_ids": ("session_id",),
    "voxel_spacings": ("voxel_size",),
    "coordinates_angstrom": ("x_angstrom", "y_angstrom", "z_angstrom"),
    "global_weight": ("global_weight",),
    "sources": ("source",),
    "indices": ("index",),
    "edge": ("edge",),
}


def write_h5(table, out: Path, meta: dict) -> None:
    """``table`` in the layout of the module docstring, with ``meta`` (the ``cryolens`` JSON)."""
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


def read_h5(path: Path):
    """An HDF5 file in CryoLens's copick-embedding layout as one Arrow table: its groups'
    rows in the file's order of groups (see the module docstring)."""
    import h5py
    import pyarrow as pa

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file: {exc}", field="embeddings") from exc
    with handle:
        groups = {name: item for name, item in handle.items() if isinstance(item, h5py.Group)
                  and isinstance(item.get("embeddings"), h5py.Dataset)}
        if not groups:
            raise InputError(f"{path}: no group holds an `embeddings` dataset; map reads the "
                             "HDF5 files `cryolens embed` (or CryoLens's own copick-embedding "
                             "script) writes", field="embeddings")
        widths = {name: group["embeddings"].shape for name, group in groups.items()}
        for name, shape in widths.items():
            if len(shape) != 2:
                raise InputError(f"{path}: {name}/embeddings has shape {shape}, not "
                                 "(particles, dimensions)", field="embeddings")
        if len({shape[1] for shape in widths.values()}) > 1:
            listed = ", ".join(f"{name}: {shape[1]}" for name, shape in widths.items())
            raise InputError(f"{path}: the groups' embeddings differ in width ({listed} "
                             "dimensions), so they cannot share one map", field="embeddings")
        tables = [_h5_group_table(path, name, group) for name, group in groups.items()]
        meta = handle.get("metadata")
        attrs = dict(meta.attrs) if isinstance(meta, h5py.Group) else {}
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"{path}: the groups' datasets disagree: {exc}",
                         field="embeddings") from exc
    return table.replace_schema_metadata(
        {key.encode(): _text(attrs[key]).encode() for key in METADATA_KEYS if key in attrs})


def _h5_group_table(path: Path, name: str, group):
    """One group's rows: the columns of ``H5_COLUMNS`` it has, then the embedding."""
    import h5py
    import pyarrow as pa

    emb = np.asarray(group["embeddings"][()], np.float32)
    n = len(emb)
    columns = {"run": pa.array([None if name == "particles" else name] * n, pa.string())}
    for dataset, names in H5_COLUMNS.items():
        if not isinstance(group.get(dataset), h5py.Dataset):
            continue
        data = np.asarray(group[dataset][()])
        if data.ndim == 0 or len(data) != n or data.size != n * len(names):
            raise InputError(f"{path}: {name}/{dataset} has shape {data.shape}, but "
                             f"{name}/embeddings has {n} rows", field="embeddings")
        data = data.reshape(n, len(names))
        for j, column in enumerate(names):
            columns[column] = _column(data[:, j])
    for k in range(emb.shape[1]):
        columns[f"embedding_{k}"] = pa.array(emb[:, k])
    return pa.table(columns)


def _column(values: np.ndarray):
    """Values as the Parquet file holds them: text decoded, with "" as None; NaN as None."""
    import pyarrow as pa

    if values.dtype.kind in "SUO":
        return pa.array([_text(v) or None for v in values], pa.string())
    if values.dtype.kind == "f":
        return pa.array(values.astype(np.float64), from_pandas=True)
    return pa.array(values)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["H5_COLUMNS", "read_h5", "write_h5"]
