"""Rows of a ``cryolens embed`` table (or a selection of them) written back as particle tables:
STAR in RELION 5's tomography layout, or a Dynamo ``.tbl`` with its ``.doc`` catalogue.

Each particle is written at the centre of the box that was embedded (``x_voxel`` .. ``z_voxel``),
so reading the written table with the same tomograms gives the same boxes, voxel for voxel.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryolens.errors import InputError
from cryolens.tables import conventions as cv
from cryolens.tables.read import INSTALL_TABLES

EXPORT_SUFFIXES = {".star": "star", ".tbl": "dynamo"}
#: Columns of an embedding table that an export reads.
COLUMNS = ("source", "index", "format", "run", "voxel_size", "x_voxel", "y_voxel", "z_voxel",
           "particle_name", "tomogram", "tomogram_shape")


def read_rows(path: str | Path):
    """The columns an export needs from a Parquet table, as a pandas DataFrame."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in COLUMNS if c in names])
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Parquet table: {exc}", field="table") from exc
    frame = table.to_pandas()
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    return frame


def export_rows(rows, out: str | Path, *, where: str = "the table", overwrite: bool = False
                ) -> str:
    """Write ``rows`` (a DataFrame with the :data:`COLUMNS` of ``cryolens embed``'s Parquet) to
    ``out``, STAR or ``.tbl`` by its suffix; returns a line saying what was written. Every row
    must be a particle cut from a tomogram (a particle table's or a copick pick)."""
    out = Path(out)
    kind = EXPORT_SUFFIXES.get(out.suffix.lower())
    if kind is None:
        raise InputError(f"{out}: write .star (RELION 5) or .tbl (Dynamo)", field="output")
    if len(rows) == 0:
        raise InputError(f"{where} has no rows to export", field="table")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; use --overwrite to replace it, or another -o",
                         field="output")
    rows = rows.reset_index(drop=True)
    centres = _centres(rows, where)
    if kind == "star":
        _write_star(rows, centres, out, where)
    else:
        _write_dynamo(rows, centres, out)
    tomograms = rows["run"].nunique()
    also = f" and {out.with_suffix('.doc')}" if kind == "dynamo" else ""
    return (f"wrote {len(rows)} particles in {tomograms} tomogram{'s' if tomograms != 1 else ''} "
            f"to {out}{also}")


def _describe(rows, i: int, where: str) -> str:
    source, index = rows.at[i, "source"], rows.at[i, "index"]
    return f"{where} row {i} ({source} particle {index})"


def _centres(rows, where: str) -> np.ndarray:
    """(N, 3) int64 box centres x, y, z; a row without one (or without its tomogram's name) is
    an error naming it."""
    for column in ("x_voxel", "y_voxel", "z_voxel", "run"):
        missing = np.flatnonzero(rows[column].isna().to_numpy())
        if missing.size:
            i = int(missing[0])
            raise InputError(f"{_describe(rows, i, where)}: no position in a tomogram ({column} "
                             "is empty); only particles cut from tomograms (particle tables, "
                             "copick picks) can be exported", field="table")
    return rows[["x_voxel", "y_voxel", "z_voxel"]].to_numpy(np.int64)


def _shapes(rows, where: str) -> np.ndarray:
    """(N, 3) tomogram sizes x, y, z in voxels, from ``tomogram_shape`` ('z x y x x')."""
    out = np.empty((len(rows), 3), np.float64)
    for i, text in enumerate(rows["tomogram_shape"]):
        try:
            z, y, x = (int(v) for v in str(text).split("x"))
        except ValueError:
            raise InputError(f"{_describe(rows, i, where)}: no tomogram size (tomogram_shape "
                             f"is {text!r}), which RELION 5's centred coordinates need; embed "
                             "the particles again with this version", field="table") from None
        out[i] = (x, y, z)
    return out


def _write_star(rows, centres: np.ndarray, out: Path, where: str) -> None:
    import pandas as pd

    try:
        import starfile
    except ImportError as exc:
        raise InputError(f"writing STAR needs the starfile package: {INSTALL_TABLES}",
                         field="output") from exc
    voxel = rows["voxel_size"].to_numpy(np.float64)
    bad = np.flatnonzero(~(np.isfinite(voxel) & (voxel > 0)))
    if bad.size:
        raise InputError(f"{_describe(rows, int(bad[0]), where)}: no voxel size",
                         field="table")
    centred = cv.position_to_relion_centered(centres.astype(np.float64), voxel,
                                             _shapes(rows, where))
    tomo = rows["run"].astype(str).to_numpy()
    counts: dict[str, int] = {}
    names = []
    for i, run in enumerate(tomo):
        counts[run] = counts.get(run, 0) + 1
        own = rows.at[i, "particle_name"]
        keep = rows.at[i, "format"] == "star" and isinstance(own, str) and own and \
            not any(c.isspace() for c in own)
        names.append(own if keep else f"{run}/{counts[run]}")
    particles = pd.DataFrame({
        "rlnTomoName": tomo,
        "rlnTomoParticleName": names,
        "rlnCenteredCoordinateXAngst": centred[:, 0],
        "rlnCenteredCoordinateYAngst": centred[:, 1],
        "rlnCenteredCoordinateZAngst": centred[:, 2],
    })
    tmp = out.with_name(out.name + ".tmp")
    starfile.write({"particles": particles}, tmp, overwrite=True)
    os.replace(tmp, out)


def _write_dynamo(rows, centres: np.ndarray, out: Path) -> None:
    import pandas as pd

    try:
        import dynamotable
    except ImportError as exc:
        raise InputError(f"writing a Dynamo table needs the dynamotable package: "
                         f"{INSTALL_TABLES}", field="output") from exc
    files = [str(t) if isinstance(t, str) and t else str(r)
             for t, r in zip(rows["tomogram"], rows["run"], strict=True)]
    numbers: dict[str, int] = {}
    for name in files:
        numbers.setdefault(name, len(numbers) + 1)  # Dynamo counts tomograms from 1
    xyz = cv.position_to_dynamo(centres.astype(np.float64))
    table = pd.DataFrame({"tag": np.arange(1, len(rows) + 1), "x": xyz[:, 0], "y": xyz[:, 1],
                          "z": xyz[:, 2], "tomo": [numbers[f] for f in files],
                          "tomo_file": files})
    stem = out.with_name(out.stem + ".tmp")
    dynamotable.write(table, str(stem) + ".tbl")  # also writes <stem>.doc
    os.replace(str(stem) + ".doc", out.with_suffix(".doc"))
    os.replace(str(stem) + ".tbl", out)


__all__ = ["COLUMNS", "EXPORT_SUFFIXES", "export_rows", "read_rows"]
