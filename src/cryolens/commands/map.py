"""``cryolens map embeddings.parquet -o map.png``: the embeddings in 2-D (PCA, and UMAP when
umap-learn is installed), coloured by object, run or any column."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryolens.errors import InputError


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "map", parents=[common], description=__doc__.split("\n\n")[0],
        help="a 2-D map (PCA, UMAP) of embeddings from `embed`")
    p.add_argument("embeddings", help="a Parquet file written by `cryolens embed`")
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
    import pyarrow.parquet as pq

    if path.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(f"{path}: map reads the Parquet files `cryolens embed` writes",
                         field="embeddings")
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}",
                         field="embeddings") from exc


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
