"""``cryolens map embeddings.parquet -o map.png``: the embeddings in 2-D (PCA, and UMAP when
umap-learn is installed), coloured by your labels, the object or the run.

It reads what ``cryolens embed`` writes, Parquet or HDF5 (:func:`cryolens.embtable.read_table`;
an HDF5 file of CryoLens's own copick-embedding script too). ``--labels labels.csv`` adds your
own columns (a class, a score, ...) matched on a column of the file, without rewriting it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryolens.errors import InputError

EXAMPLES = """examples:
  cryolens map embeddings.parquet -o map.png
  cryolens map embeddings.parquet -o map.png --labels labels.csv
  cryolens map picks.parquet -o map.pdf --color-by run --dims affinity
labels.csv: a header, then one row per particle; the first column is the one to match on
(source, particle_key, run or index; a source may be a bare file name), e.g.
  source,class
  particle_000.mrc,ribosome"""


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "map", parents=[common], description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        help="a 2-D map (PCA, UMAP) of embeddings from `embed`")
    p.add_argument("embeddings",
                   help="a Parquet or HDF5 (.h5, .hdf5) file written by `cryolens embed`; an "
                        "HDF5 file written by CryoLens's own copick-embedding script too")
    p.add_argument("-o", "--output", default="map.png",
                   help="picture to write, in the format its suffix names: .png, .pdf, "
                        ".svg, .jpg, ... (default: %(default)s)")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="add the columns of this CSV file, matched on its first column (see "
                        "below); its second column colours the map (default: none)")
    p.add_argument("--color-by", default=None,
                   help="column to colour points by (default: the --labels column, else object "
                        "or run where they differ between particles, else one colour)")
    p.add_argument("--no-umap", action="store_true",
                   help="PCA only, even when umap-learn is installed (default: off)")
    p.add_argument("--dims", choices=("all", "affinity"), default="all",
                   help="map the whole embedding or only its affinity part (the first "
                        "affinity_dims, from the file's model metadata) (default: %(default)s)")
    p.set_defaults(run=run)


def default_color(table, labels: list[str]) -> str | None:
    """The first of: the labels' first column; ``object``, then ``run``, where particles differ
    in it; None (one colour)."""
    if labels:
        return labels[0]
    for name in ("object", "run"):
        if name in table.column_names:
            values = {v for v in table[name].to_pylist() if v is not None}
            if len(values) > 1:
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
    from cryolens.embtable import embedding_columns, read_table, with_labels
    from cryolens.plots import figure_format, pca_2d, scatter_figure

    figure_format(args.output)  # a suffix matplotlib cannot write fails before any work
    table = read_table(Path(args.embeddings))
    names = embedding_columns(table.column_names)
    if not names:
        raise InputError(f"{args.embeddings} has no embedding_0.. columns", field="embeddings")
    labels: list[str] = []
    if args.labels:
        table, labels = with_labels(table, args.labels, args.embeddings)
    if args.dims == "affinity":
        names = names[: _affinity_dims(table, len(names), args.embeddings)]
    emb = np.column_stack([table[n].to_numpy() for n in names]).astype(np.float64)
    color = args.color_by or default_color(table, labels)
    if color is not None and color not in table.column_names:
        raise InputError(f"--color-by {color}: {args.embeddings} has no such column; it has "
                         f"{', '.join(table.column_names[:12])}, ...", field="color_by")
    values = table[color].to_pylist() if color else None
    coords, explained = pca_2d(emb)
    panels = [("PCA", coords, (f"PC 1 ({100 * explained[0]:.0f} % of variance)",
                               f"PC 2 ({100 * explained[1]:.0f} %)"))]
    if not args.no_umap and len(emb) > 3:
        embedded = umap_2d(emb)
        if embedded is not None:
            panels.append(("UMAP", embedded, ("UMAP 1", "UMAP 2")))
    part = "affinity part of the embedding" if args.dims == "affinity" else "embedding"
    scatter_figure(args.output, panels, values, color or "",
                   title=f"{len(emb)} particles of {Path(args.embeddings).name}, "
                         f"{len(names)} dimensions ({part})")
    missing = sum(v is None for v in values) if labels and color == labels[0] else 0
    note = f"; {missing} without a label in {args.labels}" if missing else ""
    print(f"wrote {args.output}: {' and '.join(p[0] for p in panels)} of {len(emb)} particles, "
          f"coloured by {color or 'nothing (one colour)'}{note}")
    return 0


def _affinity_dims(table, total: int, where: str) -> int:
    from cryolens.embtable import metadata_of

    dims = metadata_of(table).get("affinity_dims")
    if not dims or int(dims) > total:
        raise InputError(f"{where} does not record its model's affinity dimensions (not written "
                         "by this cryolens embed, or rewritten without its metadata); map it "
                         "with --dims all", field="dims")
    return int(dims)
