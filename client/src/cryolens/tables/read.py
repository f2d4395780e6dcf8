"""Read particle tables (RELION/Warp STAR, Dynamo ``.tbl``, IMOD ``.mod``) with the teamtomo
readers, find each row's tomogram, and place each particle in it (see ``docs/tables.md``).

Every mistake in a table is one :class:`~cryolens.errors.InputError` line that names the file
and the row (1-based, as a text editor counts a table's particles; the Parquet's ``index`` is
the same row counted from 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolens.errors import InputError
from cryolens.tables import conventions as cv
from cryolens.tables.tomograms import Tomogram, TomogramFinder, dynamo_catalogue

#: Suffix of a table file -> the ``format`` its particles' records carry.
TABLE_SUFFIXES = {".star": "star", ".tbl": "dynamo", ".mod": "imod"}
INSTALL_TABLES = "pip install 'cryolens-server[tables]'"


@dataclass(frozen=True)
class TableOptions:
    """Where a table's tomograms are, and the pixel size of its coordinates when it is not
    what the table says (STAR) or the tomogram's voxel size (the default for Dynamo and IMOD)."""

    tomograms: str | None = None
    coordinate_pixel_size: float | None = None


@dataclass(frozen=True)
class Pick:
    """One row: ``position`` (x, y, z) in the tomogram's voxels, 0-based with voxel centres on
    integers; ``name`` the table's own name for the particle, if it has one."""

    row: int
    tomogram_name: str
    tomogram: Tomogram
    voxel_size: float
    position: tuple[float, float, float]
    name: str | None


def read_table(path: str | Path, options: TableOptions, declared_voxel_size: float | None = None,
               default_voxel_size: float = 10.0) -> list[Pick]:
    """Every particle of one table, placed in its tomogram. A tomogram whose header has no
    voxel size is taken at ``declared_voxel_size`` or else ``default_voxel_size``."""
    path = Path(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: not a particle table (.star, .tbl or .mod)", field="source")
    finder = TomogramFinder(options.tomograms, declared_voxel_size)
    reader = {"star": _star, "dynamo": _dynamo, "imod": _imod}[kind]
    rows, names, tomo_names, paths, place = reader(path, options, finder)
    if not rows:
        raise InputError(f"{path}: the table holds no particles", field="source")
    tomograms: list[Tomogram] = []
    for row, _name, where in zip(rows, tomo_names, paths, strict=True):
        if isinstance(where, str):
            raise InputError(f"{_row(path, row, names)}: {where}", field="tomograms")
        tomograms.append(finder.open(where.resolve()))
    voxel = np.array([t.voxel_size or declared_voxel_size or default_voxel_size
                      for t in tomograms])
    shapes = cv.shape_xyz([t.shape for t in tomograms])
    position = place(voxel, shapes, tomograms)
    centres = cv.box_centres(position)
    bad = np.flatnonzero(cv.outside(centres, shapes))
    if bad.size:
        i = int(bad[0])
        more = f" (and {bad.size - 1} more rows)" if bad.size > 1 else ""
        x, y, z = position[i]
        raise InputError(
            f"{_row(path, rows[i], names)}: position x={x:.1f}, y={y:.1f}, z={z:.1f} voxels is "
            f"outside tomogram {tomograms[i].path.name} ({int(shapes[i][0])} x "
            f"{int(shapes[i][1])} x {int(shapes[i][2])} voxels, x y z){more}; check the "
            "table's pixel size (--coordinate-pixel-size) and that the tomogram is the one it "
            "was picked on", field="source")
    return [Pick(row, tomo_name, tomogram, float(v), tuple(map(float, p)), name)
            for row, tomo_name, tomogram, v, p, name
            in zip(rows, tomo_names, tomograms, voxel, position, names, strict=True)]


def _row(path: Path, row: int, names: list[str | None] | None = None) -> str:
    name = names[row] if names and row < len(names) and names[row] else None
    return f"{path} row {row + 1}" + (f" ({name})" if name else "")


def _numbers(frame, columns, path: Path, names=None) -> np.ndarray:
    """(N, len(columns)) float64 from ``frame``; a cell that is not a finite number is an
    error naming its row and column."""
    import pandas as pd

    out = np.empty((len(frame), len(columns)), np.float64)
    for k, column in enumerate(columns):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raw = frame[column].iloc[int(bad[0])]
            raise InputError(f"{_row(path, int(bad[0]), names)}: {column} is {raw!r}, not a "
                             "finite number", field="source")
        out[:, k] = values
    return out


def _require(frame, columns, path: Path, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} ({what})", field="source")


def _import(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise InputError(f"reading this table needs the {module} package: {INSTALL_TABLES}",
                         field="source") from exc


# -- STAR (RELION 3/4/5, Warp) ---------------------------------------------------------------
def _star_blocks(path: Path):
    import pandas as pd

    starfile = _import("starfile")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # any parse failure is the file's fault
        raise InputError(f"{path}: not a readable STAR file: {exc}", field="source") from exc
    frames = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in frames:
        particles = frames["particles"]
    else:
        coordinates = [v for v in frames.values()
                       if {*cv.RELION_PIXEL[:1], *cv.RELION_CENTERED[:1]} & set(v.columns)]
        if not coordinates:
            raise InputError(f"{path}: no particles block (data_particles, or a loop with "
                             "rlnCoordinateX or rlnCenteredCoordinateXAngst)", field="source")
        particles = coordinates[0]
    return particles.reset_index(drop=True), frames.get("optics")


def _star(path: Path, options: TableOptions, finder: TomogramFinder):
    particles, optics = _star_blocks(path)
    columns = set(particles.columns)
    names = [str(v) for v in particles["rlnTomoParticleName"]] \
        if "rlnTomoParticleName" in columns else \
        [str(v) for v in particles["rlnImageName"]] if "rlnImageName" in columns else \
        [None] * len(particles)
    name_column = next((c for c in ("rlnTomoName", "rlnMicrographName") if c in columns), None)
    if name_column is None and finder.single is None:
        raise InputError(f"{path}: missing column rlnTomoName (or rlnMicrographName) that names "
                         "each particle's tomogram; or give the one tomogram with --tomograms "
                         "FILE.mrc", field="source")
    tomo_names = [str(v) for v in particles[name_column]] if name_column \
        else [finder.single.stem] * len(particles)
    found: dict[str, Path | str] = {}
    paths = [found.setdefault(n, finder.by_name(n)) if n not in found else found[n]
             for n in tomo_names]
    centered = any(c in columns for c in cv.RELION_CENTERED)
    wanted = cv.RELION_CENTERED if centered else cv.RELION_PIXEL
    if not centered and not any(c in columns for c in cv.RELION_PIXEL):
        raise InputError(f"{path}: no particle coordinates: expected rlnCenteredCoordinateX/Y/"
                         "ZAngst (RELION 5) or rlnCoordinateX/Y/Z (RELION 4, Warp)",
                         field="source")
    _require(particles, wanted, path, "RELION 5 centred angstrom" if centered else "pixels")
    coordinates = _numbers(particles, wanted, path, names)
    rows = list(range(len(particles)))

    def place(voxel, shapes, tomograms):
        pixel = None if centered else _star_pixel_size(particles, optics, options, voxel, path,
                                                       names)
        if all(c in columns for c in cv.RELION_ORIGIN_ANGST):
            shifts = _numbers(particles, cv.RELION_ORIGIN_ANGST, path, names)
        elif all(c in columns for c in cv.RELION_ORIGIN_PIXEL):  # RELION 3.0: pixels
            scale = pixel if pixel is not None else voxel
            shifts = _numbers(particles, cv.RELION_ORIGIN_PIXEL, path, names) * scale[:, None]
        else:
            shifts = np.zeros_like(coordinates)
        angles = _numbers(particles, cv.RELION_SUBTOMOGRAM, path, names) \
            if all(c in columns for c in cv.RELION_SUBTOMOGRAM) else None
        shifts = cv.relion_shifts(shifts, angles)
        if centered:
            return cv.relion_centered_to_position(coordinates, shifts, voxel, shapes)
        return cv.relion_pixel_to_position(coordinates, shifts, pixel, voxel)

    return rows, names, tomo_names, paths, place


def _star_pixel_size(particles, optics, options: TableOptions, voxel: np.ndarray, path: Path,
                     names) -> np.ndarray:
    """Angstrom per pixel of ``rlnCoordinateX/Y/Z``, per row: ``--coordinate-pixel-size``;
    else the optics group's ``rlnTomoTiltSeriesPixelSize`` (RELION 4); else the row's
    ``rlnTomoTiltSeriesPixelSize``, ``rlnPixelSize`` or ``rlnDetectorPixelSize`` (x 10000 /
    ``rlnMagnification``) (Warp, RELION 3); else the tomogram's voxel size."""
    n = len(particles)
    if options.coordinate_pixel_size is not None:
        return np.full(n, float(options.coordinate_pixel_size))
    if optics is not None and "rlnTomoTiltSeriesPixelSize" in optics.columns:
        sizes = _numbers(optics, ["rlnTomoTiltSeriesPixelSize"], path)[:, 0]
        if len(optics) == 1:
            return np.full(n, sizes[0])
        if "rlnOpticsGroup" in optics.columns and "rlnOpticsGroup" in particles.columns:
            groups = dict(zip(_numbers(optics, ["rlnOpticsGroup"], path)[:, 0].astype(int),
                              sizes, strict=True))
            mine = _numbers(particles, ["rlnOpticsGroup"], path, names)[:, 0].astype(int)
            for i, g in enumerate(mine):
                if g not in groups:
                    raise InputError(f"{_row(path, i, names)}: rlnOpticsGroup {g} is not in the "
                                     "optics block", field="source")
            return np.array([groups[g] for g in mine])
    for column in ("rlnTomoTiltSeriesPixelSize", "rlnPixelSize"):
        if column in particles.columns:
            return _numbers(particles, [column], path, names)[:, 0]
    if "rlnDetectorPixelSize" in particles.columns:
        detector = _numbers(particles, ["rlnDetectorPixelSize"], path, names)[:, 0]
        if "rlnMagnification" in particles.columns:
            detector = detector * 1e4 / _numbers(particles, ["rlnMagnification"], path,
                                                 names)[:, 0]
        return detector
    return voxel


# -- Dynamo ----------------------------------------------------------------------------------
def _dynamo(path: Path, options: TableOptions, finder: TomogramFinder):
    dynamotable = _import("dynamotable")
    try:
        table = dynamotable.read(str(path))
    except Exception as exc:  # any parse failure is the file's fault
        raise InputError(f"{path}: not a readable Dynamo table: {exc}", field="source") from exc
    if table.shape[1] < 26:
        raise InputError(f"{path}: {table.shape[1]} columns; a Dynamo table holds the tomogram "
                         "in column 20 and x, y, z in columns 24-26", field="source")
    table = table.reset_index(drop=True)
    tags = _numbers(table, ["tag"], path)[:, 0]
    names = [f"tag {int(t)}" if float(t).is_integer() else f"tag {t}" for t in tags]
    numbers = _numbers(table, ["tomo"], path, names)[:, 0]
    if finder.single is not None:
        paths: list[Path | str] = [finder.single] * len(table)
    else:
        catalogue = dynamo_catalogue(finder.where, path)
        listed = ", ".join(str(k) for k in sorted(catalogue)[:6])
        paths = [catalogue.get(int(t), f"tomogram {int(t)} (column 20) is not in the catalogue "
                                       f"(it lists {listed})") for t in numbers]
        paths = [p if isinstance(p, str) or p.exists() else f"tomogram {p} is not there"
                 for p in paths]
    tomo_names = [p.stem if isinstance(p, Path) else str(int(t))
                  for p, t in zip(paths, numbers, strict=True)]
    xyz = _numbers(table, cv.DYNAMO_POSITION, path, names)
    shifts = _numbers(table, cv.DYNAMO_SHIFT, path, names)

    def place(voxel, shapes, tomograms):
        return cv.dynamo_to_position(xyz, shifts, _scale(options, voxel))

    return list(range(len(table))), names, tomo_names, paths, place


# -- IMOD ------------------------------------------------------------------------------------
def _imod(path: Path, options: TableOptions, finder: TomogramFinder):
    imodmodel = _import("imodmodel")
    try:
        points = imodmodel.read(str(path))
    except Exception as exc:  # an empty or damaged model
        raise InputError(f"{path}: not a readable IMOD model with points: {exc}",
                         field="source") from exc
    points = points.reset_index(drop=True)
    _require(points, ("object_id", "contour_id", "x", "y", "z"), path, "IMOD points")
    order = points.groupby(["object_id", "contour_id"]).cumcount().to_numpy()
    names = [f"object {int(o) + 1} contour {int(c) + 1} point {int(k) + 1}"
             for o, c, k in zip(points["object_id"], points["contour_id"], order, strict=True)]
    where = finder.by_name(path.stem)
    xyz = _numbers(points, ("x", "y", "z"), path, names)

    def place(voxel, shapes, tomograms):
        return cv.imod_to_position(xyz, _scale(options, voxel))

    tomo_name = where.stem if isinstance(where, Path) else path.stem
    return (list(range(len(points))), names, [tomo_name] * len(points), [where] * len(points),
            place)


def _scale(options: TableOptions, voxel: np.ndarray) -> np.ndarray:
    """Table pixels per tomogram voxel: 1 unless the table's pixel size is given."""
    if options.coordinate_pixel_size is None:
        return np.ones_like(voxel)
    return float(options.coordinate_pixel_size) / voxel


__all__ = ["INSTALL_TABLES", "TABLE_SUFFIXES", "Pick", "TableOptions", "read_table"]
