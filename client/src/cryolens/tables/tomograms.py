"""The tomograms a particle table's rows point at: found by name in a folder, or through a
Dynamo ``.doc`` catalogue, and opened as MRC maps (header checked, voxels memory-mapped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolens import formats
from cryolens.errors import InputError

TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".map", ".st")
#: Suffixes a table may leave on a tomogram's name (Warp's ``.tomostar``, RELION's ``:mrc``).
NAME_SUFFIXES = (*TOMOGRAM_SUFFIXES, ".tomostar", ".mrcs", ".tif", ".tiff", ".eer")


@dataclass(frozen=True)
class Tomogram:
    """One tomogram: ``shape`` (z, y, x) voxels, ``voxel_size`` angstrom (None when the header
    has none and none was declared)."""

    path: Path
    shape: tuple[int, int, int]
    voxel_size: float | None
    dtype: np.dtype
    offset: int
    stored: tuple[int, int, int]  # (sections, rows, columns) as in the file
    axes: tuple[int, int, int]

    def data(self) -> np.ndarray:
        """The voxels (z, y, x): a read-only memory map when stored in that order."""
        array = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                          shape=self.stored)
        return formats.to_zyx(array, self.axes)


def open_tomogram(path: Path, declared_voxel_size: float | None = None) -> Tomogram:
    """Check ``path``'s MRC header (strictly, as :func:`cryolens.formats.mrc_layout` does) and
    describe it; the whole map is one tomogram whatever its space group says."""
    try:
        layout = formats.mrc_layout(np.fromfile(path, np.uint8, count=1024),
                                    path.stat().st_size, path.name)
    except (ValueError, OSError) as exc:
        raise InputError(f"tomogram {path}: not a valid MRC file: {exc}",
                         field="tomograms") from exc
    header = layout.header
    stored = tuple(int(header[k]) for k in ("nz", "ny", "nx"))
    shape = tuple(stored[a] for a in layout.axes)
    voxel = declared_voxel_size
    if voxel is None and layout.voxel_size is not None:
        sizes = np.asarray(layout.voxel_size)
        if not np.allclose(sizes, sizes[0], rtol=0.01):
            raise InputError(f"tomogram {path}: anisotropic voxel size {tuple(sizes.tolist())} "
                             "angstrom; CryoLens needs cubic voxels", field="tomograms")
        voxel = float(sizes[0])
    return Tomogram(path, shape, voxel, layout.dtype, layout.offset, stored, layout.axes)


def _bare_name(name: str) -> str:
    """A table's tomogram name as a file stem: no folders, no ``:mrc``, no known suffix."""
    name = name.strip().replace("\\", "/").rsplit("/", 1)[-1].split(":", 1)[0]
    lowered = name.lower()
    for suffix in NAME_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


class TomogramFinder:
    """Tomograms by the names tables give them, in a folder (or one file for every name).

    A name matches a tomogram whose stem is the name, or ``rec_`` and the name (RELION 5), or,
    when exactly one does, whose stem starts with the name and ``_`` or ``.`` (Warp's
    ``TS_01_10.00Apx.mrc``)."""

    def __init__(self, where: str | Path | None, declared_voxel_size: float | None) -> None:
        if where is None:
            raise InputError("a particle table needs its tomograms: --tomograms DIR (a folder "
                             "of MRC tomograms; for Dynamo also a .doc catalogue)",
                             field="tomograms")
        self.where = Path(where)
        if not self.where.exists():
            raise InputError(f"--tomograms {self.where}: no such file or folder",
                             field="tomograms")
        self.declared = declared_voxel_size
        self.single = self.where if self.where.is_file() and \
            self.where.suffix.lower() in TOMOGRAM_SUFFIXES else None
        self._opened: dict[Path, Tomogram] = {}
        self._files: list[Path] | None = None

    def files(self) -> list[Path]:
        if self.single is not None:
            return [self.single]
        if self._files is None:
            self._files = sorted(p for p in self.where.iterdir()
                                 if p.is_file() and p.suffix.lower() in TOMOGRAM_SUFFIXES) \
                if self.where.is_dir() else []
        return self._files

    def open(self, path: Path) -> Tomogram:
        if path not in self._opened:
            self._opened[path] = open_tomogram(path, self.declared)
        return self._opened[path]

    def by_name(self, name: str) -> Path | str:
        """The tomogram for ``name``, or a sentence saying why there is none."""
        if self.single is not None:
            return self.single
        bare = _bare_name(name)
        files = self.files()
        for stem in (bare, f"rec_{bare}"):
            exact = [p for p in files if p.stem == stem]
            if exact:
                return exact[0]
        near = [p for p in files if p.stem.startswith((f"{bare}_", f"{bare}."))]
        if len(near) == 1:
            return near[0]
        if near:
            return (f"several tomograms in {self.where} could be {name!r}: "
                    f"{', '.join(p.name for p in near[:4])}; rename them or give the one file "
                    "with --tomograms")
        listed = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        return (f"no tomogram named {name!r} in {self.where} (it holds "
                f"{listed or 'no MRC files'})")


def dynamo_catalogue(where: Path, table: Path) -> dict[int, Path]:
    """A Dynamo ``.doc`` catalogue (``index path`` lines) as {index: path}: ``where`` itself,
    or ``<table>.doc`` in ``where`` or beside the table, or the only ``.doc`` in ``where``.
    Relative paths are taken from the catalogue's folder; a path that is not there is looked
    for by its file name in ``where`` (catalogues often hold another computer's paths)."""
    if where.is_file() and where.suffix.lower() == ".doc":
        doc = where
    else:
        folder = where if where.is_dir() else where.parent
        candidates = [folder / f"{table.stem}.doc", table.with_suffix(".doc")]
        doc = next((c for c in candidates if c.is_file()), None)
        if doc is None:
            docs = sorted(folder.glob("*.doc"))
            if len(docs) != 1:
                found = f"{len(docs)} .doc files" if docs else "no .doc file"
                raise InputError(f"{table}: a Dynamo table names tomograms by number; "
                                 f"--tomograms must be a .doc catalogue (index path lines) or "
                                 f"a folder holding one, and {folder} holds {found}",
                                 field="tomograms")
            doc = docs[0]
    entries: dict[int, Path] = {}
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith(("#", "%")):
            continue
        try:
            index = int(float(fields[0]))
            path = Path(fields[1].strip().strip("'\""))
        except (ValueError, IndexError):
            raise InputError(f"{doc} line {number}: expected 'index path', got {line.strip()!r}",
                             field="tomograms") from None
        if not path.is_absolute():
            path = doc.parent / path
        if not path.exists():
            local = (where if where.is_dir() else doc.parent) / path.name
            path = local if local.exists() else path
        entries[index] = path
    return entries


__all__ = ["Tomogram", "TomogramFinder", "dynamo_catalogue", "open_tomogram"]
