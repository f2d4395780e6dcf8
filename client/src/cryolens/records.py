"""What one particle is and where it came from (:class:`ParticleRecord`), how particles are
read (:class:`ReadOptions`, :class:`CopickOptions`) and what a batch of them is; the model's box
and voxel size. :mod:`cryolens.io` reads particles with these."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from cryolens.tables.read import TABLE_SUFFIXES

#: What CryoLens models expect: a 48^3 box at 10 angstrom per voxel.
MODEL_BOX = 48
MODEL_VOXEL_SIZE = 10.0
#: Relative difference of voxel sizes still taken as equal (10.05 A for 10 A passes).
VOXEL_TOLERANCE = 0.01
MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: Formats whose boxes are cut from a tomogram (copick picks, particle tables).
CUT_FORMATS = ("copick", *TABLE_SUFFIXES.values())
INSTALL_IO = "pip install 'cryolens-server[io]'"


@dataclass(frozen=True)
class ReadOptions:
    """How particles are checked and conformed to the model (see the module docstring)."""

    box: int = MODEL_BOX
    voxel_size: float = MODEL_VOXEL_SIZE
    rescale: bool = False
    fit: bool = False
    permissive: bool = False
    declared_voxel_size: float | None = None
    dataset: str | None = None  # HDF5/zarr: the array to read (default: the only 4-D one)
    skip_unreadable: bool = False  # MRC files that cannot be read as particles: warn and skip


@dataclass(frozen=True)
class CopickOptions:
    """Which picks of a copick project become particles."""

    object: str | None = None
    voxel_spacing: float = MODEL_VOXEL_SIZE
    runs: tuple[str, ...] = ()
    tomo_type: str | None = None
    user_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class ParticleRecord:
    """Where one particle came from. Coordinates are those of the particle centre (a pick's
    full position: location plus the shift in its transform); voxel coordinates are the
    angstrom ones divided by the voxel size and rounded to the nearest voxel. ``origin_*`` is
    where the particle's box starts, in angstrom (an MRC header's origin, or the corner of the
    box cut from a tomogram; moved by what ``fit`` cropped or padded), so written
    reconstructions land where their input was. ``padded_fraction`` is the part of the box
    filled in (past a tomogram's edge, or by ``fit``); ``fitted_from`` the box (z x y x x
    voxels) that ``fit`` cropped or padded to the model's, else None."""

    source: str
    index: int
    format: str
    voxel_size: float | None = None
    origin_x: float = 0.0
    origin_y: float = 0.0
    origin_z: float = 0.0
    run: str | None = None
    object: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    tomo_type: str | None = None
    x_angstrom: float | None = None
    y_angstrom: float | None = None
    z_angstrom: float | None = None
    x_voxel: int | None = None
    y_voxel: int | None = None
    z_voxel: int | None = None
    edge: bool = False
    padded_fraction: float = 0.0
    rescaled: bool = False
    fitted_from: str | None = None
    particle_name: str | None = None  # a table's own name for the particle (see cryolens.tables)
    tomogram: str | None = None  # the tomogram file a table's particle was cut from
    tomogram_shape: str | None = None  # z x y x x voxels of the tomogram the box was cut from

    @property
    def key(self) -> str:
        """Unique within a set of inputs: used to skip done particles when resuming. The source
        is resolved, so the same file given by a relative or an absolute path is one particle."""
        source = resolved(self.source)
        if self.run is not None:
            return (f"{source}|{self.run}|{self.object}|{self.user_id}|{self.session_id}"
                    f"|{self.tomo_type}|{self.index}")
        return f"{source}|{self.index}"

    @property
    def label(self) -> str:
        """A short name for file names and plots."""
        if self.run is not None and self.format == "copick":
            return f"{self.run}_{self.object}_{self.user_id}_{self.session_id}_{self.index}"
        return f"{Path(self.source).stem}_{self.index}"

    def as_row(self) -> dict:
        return asdict(self)


RECORD_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ParticleRecord))


@functools.lru_cache(maxsize=4096)
def resolved(source: str) -> str:
    """A source path in one form (absolute, links resolved) to compare sources by."""
    return str(Path(source).resolve())


@dataclass
class Batch:
    """``particles`` (n, box, box, box) float32, ready for the engine; one record each."""

    particles: np.ndarray
    records: list[ParticleRecord]

    def __len__(self) -> int:
        return len(self.records)
