"""``cryolens map embeddings.parquet -o map.png``: the embeddings in 2-D (PCA, and UMAP when
umap-learn is installed), coloured by object, run or any column.

It reads what ``cryolens embed`` writes, Parquet or HDF5. An HDF5 file in CryoLens's
copick-embedding layout (ours, or one written by CryoLens's own script, which lacks our extra
datasets and ``cryolens`` metadata) becomes the table a Parquet file gives: each group that holds
``embeddings`` adds its rows, with ``run`` (the group's name; None for ``particles``),
``object`` (``structure_labels``), ``user_id``, ``session_id``, ``voxel_size``,
``x_angstrom`` .. ``z_angstrom``, ``global_weight``, ``source``, ``index`` and ``edge`` where the
group has the dataset they come from (see ``H5_COLUMNS``), and ``embedding_0`` ..
``embedding_{k-1}``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

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
#: The metadata attributes that a Parquet file carries as its schema's key-value metadata.
H5_METADATA = ("cryolens", "checkpoint_name", "checkpoint_sha256")


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "map", parents=[common], description=__doc__.split("\n\n")[0],
        help="a 2-D map (PCA, UMAP) of embeddings from `embed`")
    p.add_argument("embeddings",
                   help="a Parquet or HDF5 (.h5, .hdf5) file written by `cryolens embed`; an "
                        "HDF5 file written by CryoLens's own copick-embedding script too")
    p.add_argument("-o", "--output", default="map.png",
                   help="picture to write, in the format its suffix names: .png, .pdf, "
                        ".svg, .jpg, ... (default: %(default)s)")
    p.add_argument("--color-by", default=None,
                   help="column to colour points by (default: object if set, else run, "
                        "else source)")
    p.add_argument("--no-umap", action="store_true",
                   help="PCA only, even when umap-learn is installed (default: off)")
    p.add_argument("--dims", choices=("all", "affinity"), default="all",
                   help="map the whole embedding or only its affinity part (the first "
                        "affinity_dims, from the file's checkpoint) (default: %(default)s)")
    p.set_defaults(run=run)


def read_table(path: Path):
    """The embeddings in ``path``, Parquet or HDF5 (by its suffix), as one Arrow table with
    the Parquet file's columns and key-value metadata."""
    from cryolens.commands.embed import FORMATS

    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: map reads the Parquet (.parquet) and HDF5 (.h5) files "
                         "`cryolens embed` writes", field="embeddings")
    if kind == "hdf5":
        return read_h5(path)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}",
                         field="embeddings") from exc


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
        {key.encode(): _text(attrs[key]).encode() for key in H5_METADATA if key in attrs})


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


def default_color(table) -> str | None:
    for name in ("object", "run", "source"):
        if name in table.column_names and table[name].null_count < table.num_rows:
            return name
    return None


def umap_2d(embeddings: np.ndarray) -> np.ndarray | None:
    try:
        import umap
    except ImportError:
        return None
    neighbours = max(2, min(15, len(embeddings) - 1))
    return umap.UMAP(n_neighbors=neighbours, random_state=0).fit_transform(embeddings)


def run(args: argparse.Namespace) -> int:
    from cryolens.commands.embed import embedding_columns
    from cryolens.plots import figure_format, pca_2d, scatter_figure

    figure_format(args.output)  # a suffix matplotlib cannot write fails before any work
    table = read_table(Path(args.embeddings))
    names = embedding_columns(table.column_names)
    if not names:
        raise InputError(f"{args.embeddings} has no embedding_0.. columns", field="embeddings")
    if args.dims == "affinity":
        names = names[: _affinity_dims(table, len(names))]
    emb = np.column_stack([table[n].to_numpy() for n in names]).astype(np.float64)
    color = args.color_by or default_color(table)
    if color is not None and color not in table.column_names:
        raise InputError(f"no column {color!r}; columns: {', '.join(table.column_names)}",
                         field="color_by")
    values = table[color].to_pylist() if color else None
    coords, explained = pca_2d(emb)
    panels = [(f"PCA ({100 * explained[0]:.0f} % + {100 * explained[1]:.0f} % of variance)",
               coords)]
    if not args.no_umap and len(emb) > 3:
        embedded = umap_2d(emb)
        if embedded is not None:
            panels.append(("UMAP", embedded))
    scatter_figure(args.output, panels, values, color or "",
                   title=f"{len(emb)} particles, {len(names)} embedding dimensions")
    print(f"wrote {args.output}: {' and '.join(p[0].split(' ')[0] for p in panels)} of "
          f"{len(emb)} particles, coloured by {color or 'nothing'}")
    return 0


def _affinity_dims(table, total: int) -> int:
    import json

    meta = json.loads((table.schema.metadata or {}).get(b"cryolens", b"{}"))
    dims = meta.get("affinity_dims")
    if not dims or int(dims) > total:
        raise InputError("this file does not record the affinity dimensions; use --dims all",
                         field="dims")
    return int(dims)
