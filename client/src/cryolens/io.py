"""Particles from the files people bring: MRC/MRCS, a folder of them, HDF5, zarr, ``.npy`` and
copick projects, checked against what the model expects and streamed in batches.

:func:`open_particles` lists every particle first (headers and picks only, no voxel data), so
a caller knows how many there are and which are already done before anything is read; then
:meth:`ParticleSet.batches` reads them in order, a batch at a time, optionally on a background
thread so that reading the next batch overlaps the model's work on this one.

Every particle keeps a :class:`ParticleRecord` that says where it came from (file and index, or
run, object, pick and coordinates), its voxel size, and whether its box ran over the edge of a
tomogram and was padded. Nothing is dropped silently: an edge pick is padded and flagged.

What the model expects, and what happens otherwise (see :class:`ReadOptions`):

- a cubic box of ``box`` voxels (48): another size is an :class:`~cryolens.errors.InputError`,
  or with ``fit=True`` a centred crop or pad (with the particle's mean);
- ``voxel_size`` angstrom per voxel (10): a file that declares another is an error, or with
  ``rescale=True`` it is resampled (``scipy.ndimage.zoom``, cubic) to the model's voxel size;
  formats that carry no voxel size (``.npy``, HDF5/zarr without a ``voxel_size`` attribute, an
  MRC header with zero cell) are taken at ``declared_voxel_size`` or else the model's;
- MRC headers are read strictly (``mrcfile``, ``permissive=False``) unless ``permissive=True``;
  an MRC file that cannot be read as particles (a damaged header, a size that does not match it,
  a 2-D image) is an error, or with ``skip_unreadable=True`` a warning and the file is left out.

Array axes are z, y, x throughout, as in the files; an MRC file that stores its axes in another
order (the header's mapc, mapr, maps) is transposed to z, y, x as it is read.
"""
from __future__ import annotations

import functools
import hashlib
import math
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from cryolens import formats
from cryolens.errors import InputError
from cryolens.tables.read import TABLE_SUFFIXES, TableOptions

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


# -- readers: list cheaply, read on demand -------------------------------------------------------
class _Reader:
    """One input file (or project): ``records`` are known up front, ``read(locals)`` loads."""

    records: list[ParticleRecord]

    def read(self, items: Sequence[int]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose size and modification time tell whether the input changed."""
        return [self.path]

    def close(self) -> None:
        pass


def _voxel_from(value, where: str) -> float | None:
    """A voxel size from a header or attribute: None when absent or zero (unknown)."""
    if value is None:
        return None
    sizes = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if sizes.size == 0 or not np.all(np.isfinite(sizes)) or np.all(sizes == 0):
        return None
    if sizes.size > 1 and not np.allclose(sizes, sizes[0], rtol=VOXEL_TOLERANCE):
        raise InputError(f"{where}: anisotropic voxel size {tuple(sizes.tolist())} angstrom; "
                         "CryoLens needs cubic voxels", field="source")
    return float(sizes[0])


class _MrcReader(_Reader):
    """One MRC/MRCS file. Strict (the default): the header is checked by
    :func:`cryolens.formats.mrc_layout` and the data read directly; permissive: through
    ``mrcfile``'s permissive mode, which reads what it can of damaged files. Either way the
    axes come out z, y, x whatever order the header's mapc, mapr and maps store them in (an
    order that is not a permutation of 1, 2, 3 is an error; permissive reads it as stored)."""

    def __init__(self, path: Path, options: ReadOptions) -> None:
        self.path, self.permissive = path, options.permissive
        try:
            if options.permissive:
                import mrcfile

                with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                    header = mrc.header
                self.dtype, self.offset = None, None
                try:
                    axes = formats.mrc_axes(header)
                except ValueError as exc:
                    warnings.warn(f"{path}: {exc}; read in the order stored", RuntimeWarning,
                                  stacklevel=2)
                    axes = (0, 1, 2)
            else:
                layout = formats.mrc_layout(np.fromfile(path, np.uint8, count=1024),
                                            path.stat().st_size, path.name)
                header, self.dtype, self.offset = layout.header, layout.dtype, layout.offset
                axes = layout.axes
        except (ValueError, OSError) as exc:
            hint = "" if options.skip_unreadable else "; to leave such files out and go on " \
                "with the rest, pass skip_unreadable=True (--skip-unreadable)"
            raise InputError(f"{path}: not a valid MRC file: {exc}{hint}",
                             field="source") from exc
        count, shape = formats.mrc_particles(header, path.name)
        self.count, self.shape = count, shape
        self.axes = axes
        check_3d(tuple(shape[a] for a in axes), str(path))
        sizes = formats.mrc_voxel_sizes(header)
        # a declared voxel size overrules the header's, whatever it says (anisotropic too)
        voxel = None if options.declared_voxel_size is not None else _voxel_from(sizes, str(path))
        origin = header["origin"]
        base = ParticleRecord(source=str(path), index=0, format="mrc", voxel_size=voxel,
                              origin_x=float(origin["x"]), origin_y=float(origin["y"]),
                              origin_z=float(origin["z"]))
        self.records = [replace(base, index=i) for i in range(count)]

    def read(self, items: Sequence[int]) -> list[np.ndarray]:
        try:
            if self.permissive:
                import mrcfile

                with mrcfile.mmap(self.path, mode="r", permissive=True) as mrc:
                    if mrc.data is None:
                        raise ValueError("no data could be read")
                    data = mrc.data.reshape(self.count, *self.shape)
                    return [formats.to_zyx(np.array(data[i], np.float32), self.axes) for i in items]
            per = int(np.prod(self.shape))
            if self.count == 1:
                data = np.fromfile(self.path, dtype=self.dtype, count=per, offset=self.offset)
                return [formats.to_zyx(data.reshape(self.shape).astype(np.float32, copy=False),
                                       self.axes)]
            data = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                             shape=(self.count, *self.shape))
            return [formats.to_zyx(np.array(data[i], np.float32), self.axes) for i in items]
        except (ValueError, OSError) as exc:
            raise InputError(f"{self.path}: cannot read MRC data: {exc}", field="source") from exc


class _ArrayReader(_Reader):
    """``.npy``, HDF5 and zarr: a 4-D (N, z, y, x) array, or a 3-D one as one particle."""

    def __init__(self, path: Path, kind: str, options: ReadOptions) -> None:
        self.path, self.kind, self.dataset = path, kind, options.dataset
        array, attrs, name = self._open()
        if array.ndim not in (3, 4):
            raise InputError(f"{path}: {name or 'the array'} has shape {tuple(array.shape)}; "
                             "particles are (N, z, y, x) or one (z, y, x)", field="source")
        check_3d(tuple(array.shape[-3:]), f"{path}" + (f" {name}" if name else ""))
        self.single = array.ndim == 3
        count = 1 if self.single else int(array.shape[0])
        voxel = None
        for key in ("voxel_size", "voxel_spacing", "pixel_size", "apix"):
            if key in attrs and options.declared_voxel_size is None:
                voxel = _voxel_from(attrs[key], f"{path} attribute {key}")
                break
        base = ParticleRecord(source=str(path), index=0, format=kind, voxel_size=voxel)
        self.records = [replace(base, index=i) for i in range(count)]
        self.name = name
        self._close_handle()

    def files(self) -> list[Path]:
        if self.path.is_dir():  # a zarr store: its metadata and chunks
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return [self.path]

    def _open(self):
        self._handle = None
        if self.kind == "npy":
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(f"{self.path}: not a readable .npy file: {exc}",
                                 field="source") from exc
            return array, {}, None
        if self.kind == "hdf5":
            import h5py

            try:
                handle = h5py.File(self.path, "r")
            except OSError as exc:
                raise InputError(f"{self.path}: not a readable HDF5 file: {exc}",
                                 field="source") from exc
            self._handle = handle
            found = []
            handle.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
            name = self._choose(found, lambda n: handle[n].ndim)
            dataset = handle[name]
            attrs = {**dict(handle.attrs), **dict(dataset.attrs)}
            return dataset, attrs, name
        try:
            import zarr
        except ImportError as exc:
            raise InputError(f"reading zarr needs the zarr package: {INSTALL_IO}",
                             field="source") from exc
        try:
            node = zarr.open(str(self.path), mode="r")
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable zarr store: {exc}",
                             field="source") from exc
        if hasattr(node, "shape"):
            return node, dict(node.attrs), None
        arrays = {}

        def collect(group, prefix=""):
            for key, array in group.arrays():
                arrays[prefix + key] = array
            for key, sub in group.groups():
                collect(sub, f"{prefix}{key}/")

        collect(node)
        name = self._choose(list(arrays), lambda n: arrays[n].ndim)
        return arrays[name], {**dict(node.attrs), **dict(arrays[name].attrs)}, name

    def _choose(self, names: list[str], ndim) -> str:
        if self.dataset is not None:
            if self.dataset.strip("/") not in names:
                raise InputError(f"{self.path} has no array {self.dataset!r}; it has: "
                                 f"{', '.join(names) or 'none'}", field="dataset")
            return self.dataset.strip("/")
        four = [n for n in names if ndim(n) == 4]
        if len(four) == 1:
            return four[0]
        if not four:
            raise InputError(f"{self.path} has no 4-D (N, z, y, x) array (it has: "
                             f"{', '.join(names) or 'none'}); name one with --dataset",
                             field="dataset")
        raise InputError(f"{self.path} has several 4-D arrays ({', '.join(four)}); name one "
                         "with --dataset", field="dataset")

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read(self, items: Sequence[int]) -> list[np.ndarray]:
        if self.kind == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as handle:
                dataset = handle[self.name]
                if self.single:
                    return [np.asarray(dataset[()], np.float32)]
                ordered = sorted(set(items))
                block = np.asarray(dataset[ordered], np.float32)  # h5py wants increasing indices
                rows = {i: block[k] for k, i in enumerate(ordered)}
                return [rows[i] for i in items]
        if getattr(self, "_array", None) is None:
            self._array = self._open()[0]
        if self.single:
            return [np.asarray(self._array[...], np.float32)]
        return [np.asarray(self._array[i], np.float32) for i in items]

    def close(self) -> None:
        self._close_handle()
        self.__dict__.pop("_array", None)


class _CopickReader(_Reader):
    """Boxes cut around picks in each run's tomogram; a run's tomogram is read once."""

    def __init__(self, config: Path, options: ReadOptions, picks: CopickOptions) -> None:
        try:
            import copick
            import zarr
        except ImportError as exc:
            raise InputError(f"reading a copick project needs copick and zarr: {INSTALL_IO}",
                             field="source") from exc
        if not picks.object:
            raise InputError("a copick project needs the object to embed: --object NAME",
                             field="object")
        self.config, self.options = config, options
        try:
            root = copick.from_file(str(config))
        except Exception as exc:
            raise InputError(f"{config}: not a readable copick configuration: {exc}",
                             field="source") from exc
        names = [o.name for o in root.pickable_objects]
        if picks.object not in names:
            raise InputError(f"{config}: no object {picks.object!r}; objects: {', '.join(names)}",
                             field="object")
        if picks.runs:
            runs = []
            for name in picks.runs:
                run = root.get_run(name)
                if run is None:
                    raise InputError(f"{config}: no run {name!r}", field="run")
                runs.append(run)
        else:
            runs = sorted(root.runs, key=lambda r: r.name)
        self.records, self.tomograms, self.warnings = [], {}, []
        self._zarr = zarr
        for run in runs:
            self._list_run(run, picks)
        self._cached: tuple[str, np.ndarray, float] | None = None

    def _list_run(self, run, picks: CopickOptions) -> None:
        choices = [vs for vs in run.voxel_spacings if vs.tomograms]
        if not choices:
            self.warnings.append(f"run {run.name}: no tomogram at any voxel spacing; its picks "
                                 "are skipped")
            return
        spacing = min(choices, key=lambda vs: abs(vs.voxel_size - picks.voxel_spacing))
        if not math.isclose(spacing.voxel_size, picks.voxel_spacing, rel_tol=VOXEL_TOLERANCE):
            self.warnings.append(f"run {run.name}: no tomogram at {picks.voxel_spacing:g} A; "
                                 f"the nearest, {spacing.voxel_size:g} A, is used")
        tomograms = {t.tomo_type: t for t in spacing.tomograms}
        if picks.tomo_type is not None:
            if picks.tomo_type not in tomograms:
                self.warnings.append(f"run {run.name}: no {picks.tomo_type!r} tomogram at "
                                     f"{spacing.voxel_size:g} A (has {', '.join(tomograms)}); "
                                     "its picks are skipped")
                return
            tomogram = tomograms[picks.tomo_type]
        else:
            preferred = [t for t in ("denoised", "wbp") if t in tomograms]
            tomogram = tomograms[preferred[0] if preferred else min(tomograms)]
        vs = float(spacing.voxel_size)
        check_voxel_size(vs, self.options, f"{self.config} run {run.name} ({vs:g} A)")
        store = self._zarr.open(tomogram.zarr(), mode="r")
        shape = tuple(int(n) for n in store["0"].shape)
        self.tomograms[run.name] = (tomogram, vs, shape)
        side = source_box(vs, self.options)
        for pick in run.get_picks(object_name=picks.object, user_id=picks.user_id,
                                  session_id=picks.session_id):
            positions = full_positions(pick)
            for i, (x, y, z) in enumerate(positions):
                voxel = [math.floor(c / vs + 0.5) for c in (x, y, z)]  # round half up
                lo, padded = box_corner(voxel, side, shape)
                self.records.append(ParticleRecord(
                    source=str(self.config), index=i, format="copick", voxel_size=vs,
                    origin_x=lo[2] * vs, origin_y=lo[1] * vs, origin_z=lo[0] * vs,
                    run=run.name, object=pick.pickable_object_name, user_id=pick.user_id,
                    session_id=pick.session_id, tomo_type=tomogram.tomo_type,
                    x_angstrom=float(x), y_angstrom=float(y), z_angstrom=float(z),
                    x_voxel=voxel[0], y_voxel=voxel[1], z_voxel=voxel[2],
                    edge=padded > 0, padded_fraction=padded,
                    tomogram_shape="x".join(map(str, shape))))

    def files(self) -> list[Path]:
        return [self.config]  # the picks themselves are in the records

    def _tomogram(self, run: str) -> tuple[np.ndarray, float]:
        if self._cached is None or self._cached[0] != run:
            self._cached = None  # let the previous run's tomogram go first
            tomogram, _, _ = self.tomograms[run]
            data = np.asarray(self._zarr.open(tomogram.zarr(), mode="r")["0"][...], np.float32)
            self._cached = (run, data, float(data.mean(dtype=np.float64)))
        return self._cached[1], self._cached[2]

    def read(self, items: Sequence[int]) -> list[np.ndarray]:
        out = []
        for item in items:
            record = self.records[item]
            data, mean = self._tomogram(record.run)
            side = source_box(record.voxel_size, self.options)
            lo = [round(o / record.voxel_size)
                  for o in (record.origin_z, record.origin_y, record.origin_x)]
            out.append(cut_box(data, lo, side, mean))
        return out

    def close(self) -> None:
        self._cached = None


class _TableReader(_Reader):
    """Boxes cut around a particle table's rows (:mod:`cryolens.tables`) in their tomograms,
    placed and rounded as copick picks are; a tomogram's voxels are memory-mapped."""

    def __init__(self, path: Path, options: ReadOptions, tables: TableOptions) -> None:
        from cryolens.tables.read import read_table

        self.path, self.options = path, options
        picks = read_table(path, tables, options.declared_voxel_size, options.voxel_size)
        self.tomograms = {str(p.tomogram.path): p.tomogram for p in picks}
        checked: set[str] = set()
        self.records = []
        for pick in picks:
            tomogram, vs = pick.tomogram, pick.voxel_size
            if str(tomogram.path) not in checked:
                check_voxel_size(vs, options, f"{path}: tomogram {tomogram.path} ({vs:g} A)")
                checked.add(str(tomogram.path))
            voxel = [math.floor(c + 0.5) for c in pick.position]  # round half up, as copick
            lo, padded = box_corner(voxel, source_box(vs, options), tomogram.shape)
            x, y, z = (c * vs for c in pick.position)
            self.records.append(ParticleRecord(
                source=str(path), index=pick.row, format=TABLE_SUFFIXES[path.suffix.lower()],
                voxel_size=vs, origin_x=lo[2] * vs, origin_y=lo[1] * vs, origin_z=lo[0] * vs,
                run=pick.tomogram_name, x_angstrom=x, y_angstrom=y, z_angstrom=z,
                x_voxel=voxel[0], y_voxel=voxel[1], z_voxel=voxel[2], edge=padded > 0,
                padded_fraction=padded, particle_name=pick.name, tomogram=str(tomogram.path),
                tomogram_shape="x".join(map(str, tomogram.shape))))
        self._cached: tuple[str, np.ndarray, float] | None = None

    def files(self) -> list[Path]:
        return [self.path, *(Path(p) for p in sorted(self.tomograms))]

    def read(self, items: Sequence[int]) -> list[np.ndarray]:
        out = []
        for item in items:
            record = self.records[item]
            if self._cached is None or self._cached[0] != record.tomogram:
                self._cached = None
                try:
                    data = self.tomograms[record.tomogram].data()
                    mean = float(data.mean(dtype=np.float64))
                except (ValueError, OSError) as exc:
                    raise InputError(f"tomogram {record.tomogram}: cannot read its voxels: "
                                     f"{exc}", field="tomograms") from exc
                self._cached = (record.tomogram, data, mean)
            _, data, mean = self._cached
            side = source_box(record.voxel_size, self.options)
            lo = [round(o / record.voxel_size)
                  for o in (record.origin_z, record.origin_y, record.origin_x)]
            out.append(cut_box(data, lo, side, mean))
        return out

    def close(self) -> None:
        self._cached = None


def full_positions(picks) -> np.ndarray:
    """(N, 3) particle centres x, y, z in angstrom: location plus the transform's shift."""
    if hasattr(picks, "full_positions"):
        return np.asarray(picks.full_positions(), np.float64).reshape(-1, 3)
    points, transforms = picks.numpy()
    if len(points) == 0:
        return np.zeros((0, 3))
    return np.asarray(points, np.float64) + np.asarray(transforms)[:, :3, 3]


def box_corner(voxel: Sequence[int], side: int, shape: Sequence[int]) -> tuple[list[int], float]:
    """The first voxel (z, y, x) of the ``side``^3 box centred on ``voxel`` (x, y, z: its
    voxel ``side // 2``), and the fraction of the box outside a tomogram of ``shape`` (z, y, x)."""
    lo = [c - side // 2 for c in voxel[::-1]]
    inside = np.prod([max(0, min(lo[a] + side, shape[a]) - max(lo[a], 0)) for a in range(3)])
    return lo, 1.0 - float(inside) / side**3


def cut_box(data: np.ndarray, lo: Sequence[int], side: int, fill: float) -> np.ndarray:
    """The ``side``^3 box of ``data`` starting at voxel ``lo`` (z, y, x), filled with ``fill``
    where it runs past the edge."""
    box = np.full((side,) * 3, fill, np.float32)
    src, dst = [], []
    for a in range(3):
        start, stop = max(lo[a], 0), min(lo[a] + side, data.shape[a])
        if stop <= start:
            return box
        src.append(slice(start, stop))
        dst.append(slice(start - lo[a], stop - lo[a]))
    box[tuple(dst)] = data[tuple(src)]
    return box


# -- checks and conforming ------------------------------------------------------------------------
def check_3d(shape: tuple[int, ...], where: str) -> None:
    """An InputError when a particle's (z, y, x) box is flat: an image, not a volume."""
    if min(shape) <= 1:
        raise InputError(f"{where}: particles of {'x'.join(map(str, shape))} voxels are 2-D "
                         "images, not 3-D volumes; CryoLens reads 3-D particles (one volume, or "
                         "a stack of them)", field="source")


def check_voxel_size(voxel: float | None, options: ReadOptions, where: str) -> None:
    """An InputError when a known voxel size is not the model's and rescaling was not asked."""
    if voxel is None or options.rescale:
        return
    if abs(voxel - options.voxel_size) > VOXEL_TOLERANCE * options.voxel_size:
        raise InputError(
            f"{where}: voxel size {voxel:g} A, but the model expects {options.voxel_size:g} A "
            "per voxel; pass rescale=True (--rescale) to resample them here, or "
            "declared_voxel_size (--voxel-size) if the header is wrong",
            field="voxel_size")


def source_box(voxel: float | None, options: ReadOptions) -> int:
    """Side of the box to cut, in source voxels, that covers the model's box in angstrom."""
    if voxel is None or not options.rescale or \
            abs(voxel - options.voxel_size) <= VOXEL_TOLERANCE * options.voxel_size:
        return options.box
    return max(1, round(options.box * options.voxel_size / voxel))


def conform(volume: np.ndarray, record: ParticleRecord, options: ReadOptions
            ) -> tuple[np.ndarray, ParticleRecord]:
    """Check that every voxel is finite, resample (if asked and needed), then check or fit the
    box; float32 (box,)*3 out."""
    where = record.label if record.run is not None else f"{record.source} particle {record.index}"
    if not np.isfinite(volume).all():
        bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
        raise InputError(f"{where}: {bad} voxel(s) NaN or infinite (or beyond float32); "
                         "particles must be finite", field="source")
    read_shape = volume.shape
    if record.voxel_size is not None and options.rescale and \
            abs(record.voxel_size - options.voxel_size) > VOXEL_TOLERANCE * options.voxel_size:
        from scipy import ndimage

        if record.format in CUT_FORMATS:  # the box was cut to cover the model's: fill it exactly
            factor = [options.box / n for n in volume.shape]
        else:
            factor = record.voxel_size / options.voxel_size
        volume = ndimage.zoom(volume, factor, order=3, mode="nearest").astype(np.float32)
        record = replace(record, rescaled=True)
    target = (options.box,) * 3
    if volume.shape != target:
        shape = "x".join(map(str, volume.shape))
        if not options.fit:
            was = f" (rescaled from {'x'.join(map(str, read_shape))} voxels of " \
                  f"{record.voxel_size:g} A)" if record.rescaled else ""
            raise InputError(
                f"{where}: box {shape} voxels{was}, but the model expects {options.box}^3; pass "
                "fit=True (--fit) to crop or pad it about its centre", field="box")
        # the box's corner moves by what was cropped or padded, in the voxels it is now in
        size = options.voxel_size if record.rescaled or record.voxel_size is None \
            else record.voxel_size
        dz, dy, dx = (size * start for start in fit_starts(volume.shape, options.box))
        kept = np.prod([min(n, options.box) for n in volume.shape]) / options.box**3
        record = replace(record, origin_x=record.origin_x + dx, origin_y=record.origin_y + dy,
                         origin_z=record.origin_z + dz, fitted_from=shape,
                         padded_fraction=1.0 - (1.0 - record.padded_fraction) * float(kept))
        volume = fit_box(volume, options.box)
    return np.ascontiguousarray(volume, np.float32), record


def fit_starts(shape: Sequence[int], box: int) -> list[int]:
    """For each axis, the voxel of the input where :func:`fit_box`'s output starts: the first
    voxel kept by a crop, or minus the voxels padded before the input."""
    return [(n - box) // 2 if n >= box else -((box - n) // 2) for n in shape]


def fit_box(volume: np.ndarray, box: int) -> np.ndarray:
    """Crop or pad (with the volume's mean) each axis about its centre to ``box``."""
    out = np.full((box,) * 3, volume.mean(dtype=np.float64), np.float32)
    src, dst = [], []
    for n in volume.shape:
        if n >= box:
            start = (n - box) // 2
            src.append(slice(start, start + box))
            dst.append(slice(0, box))
        else:
            start = (box - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


# -- the set of particles -------------------------------------------------------------------------
@dataclass
class ParticleSet:
    """Every particle of some inputs, listed; read them with :meth:`batches`."""

    options: ReadOptions
    readers: list[_Reader]
    items: list[tuple[int, int]] = field(default_factory=list)  # (reader, index in reader)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # MRC files left out (skip_unreadable)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def records(self) -> list[ParticleRecord]:
        return [self.readers[r].records[i] for r, i in self.items]

    def fingerprint(self) -> dict:
        """What the inputs hold now, to tell a finished or unfinished embedding of them from one
        of what they held before: ``particles`` (the count) and ``sha256`` of every particle's
        key, position and voxel size and of every input file's path (resolved), size and
        modification time."""
        digest = hashlib.sha256()
        for reader in self.readers:
            for path in reader.files():
                stat = path.stat()
                digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        for record in self.records:
            digest.update(f"{record.key}|{record.x_angstrom}|{record.y_angstrom}|"
                          f"{record.z_angstrom}|{record.voxel_size}\n".encode())
        return {"particles": len(self), "sha256": digest.hexdigest()}

    def read(self, items: Sequence[tuple[int, int]]) -> Batch:
        """Read, conform and stack some of :attr:`items`."""
        volumes: list[np.ndarray] = []
        records: list[ParticleRecord] = []
        start = 0
        while start < len(items):  # runs of the same reader, read together
            reader = items[start][0]
            stop = start
            while stop < len(items) and items[stop][0] == reader:
                stop += 1
            local = [i for _, i in items[start:stop]]
            raw = self.readers[reader].read(local)
            for volume, i in zip(raw, local, strict=True):
                volume, record = conform(volume, self.readers[reader].records[i], self.options)
                volumes.append(volume)
                records.append(record)
            start = stop
        box = (self.options.box,) * 3
        particles = np.stack(volumes) if volumes else np.zeros((0, *box), np.float32)
        return Batch(particles, records)

    def batches(self, batch_size: int, *, skip: Iterable[str] = (), prefetch: int = 2
                ) -> Iterator[Batch]:
        """Batches of up to ``batch_size`` particles in order, leaving out those whose
        :attr:`ParticleRecord.key` is in ``skip``. With ``prefetch`` > 0 a background thread
        reads up to that many batches ahead (file reads and numpy release the GIL, so they
        overlap the engine's work); errors surface here, in order."""
        skip = set(skip)
        todo = [item for item in self.items
                if not skip or self.readers[item[0]].records[item[1]].key not in skip]
        groups = [todo[i:i + batch_size] for i in range(0, len(todo), max(1, batch_size))]
        if prefetch <= 0:
            for group in groups:
                yield self.read(group)
            return
        yield from _prefetched(lambda g: self.read(g), groups, prefetch)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


_DONE = object()


def _prefetched(read, groups: list, depth: int) -> Iterator[Batch]:
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for group in groups:
                if stop.is_set():
                    return
                item = read(group)
                while not stop.is_set():
                    try:
                        results.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            results.put(exc)
            return
        results.put(_DONE)

    thread = threading.Thread(target=work, name="cryolens-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put and let the thread end
            try:
                results.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def source_kind(path: Path) -> str:
    """``mrc``, ``folder``, ``hdf5``, ``zarr``, ``npy``, ``copick`` (a ``.json`` config), or a
    particle table's ``star``, ``dynamo`` or ``imod``."""
    suffix = path.suffix.lower()
    if suffix == ".zarr" or (path.is_dir() and any((path / m).exists()
                                                   for m in (".zarray", ".zgroup", "zarr.json"))):
        return "zarr"
    if path.is_dir():
        return "folder"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".npy":
        return "npy"
    if suffix == ".json":
        return "copick"
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    raise InputError(
        f"cannot read particles from {path}: use MRC/MRCS files ({', '.join(MRC_SUFFIXES)}), a "
        "folder of them, HDF5 (.h5), zarr (.zarr), .npy, a copick configuration (.json), or a "
        "particle table (.star, .tbl, .mod, with --tomograms)", field="source")


def open_particles(sources: str | Path | Sequence[str | Path], options: ReadOptions | None = None,
                   copick: CopickOptions | None = None, tables: TableOptions | None = None,
                   **kwargs) -> ParticleSet:
    """List the particles of one or more inputs (in order; a folder's MRC files sorted by
    name; a particle table's rows in its order, each cut from its tomogram as ``tables``
    says). ``kwargs`` are :class:`ReadOptions` fields. Voxel sizes that the files declare are
    checked here, before anything is read."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    options = replace(options or ReadOptions(), **kwargs)
    declared = options.declared_voxel_size
    if declared is not None and not (math.isfinite(declared) and declared > 0):
        raise InputError(f"declared_voxel_size (--voxel-size) must be a positive, finite number "
                         f"of angstrom, not {declared!r}", field="voxel_size")
    readers: list[_Reader] = []
    warnings: list[str] = []
    skipped: list[tuple[Path, str]] = []
    for source in sources:
        path = Path(source)
        if not path.exists():  # before its kind: a mistyped folder has no suffix to go by
            raise InputError(f"{source}: no such file or folder", field="source")
        kind = source_kind(path)
        if kind == "folder":
            entries = sorted(path.iterdir())
            files = [p for p in entries if p.is_file() and p.suffix.lower() in MRC_SUFFIXES]
            if not files:
                raise InputError(f"cannot read particles from {path}: no MRC files "
                                 f"({', '.join(MRC_SUFFIXES)}) in it", field="source")
            others = [p.name + ("/" if p.is_dir() else "") for p in entries
                      if p not in files and not p.name.startswith(".")]
            if others:
                listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                warnings.append(f"{path}: {len(others)} entries that are not MRC files are not "
                                f"read ({listed}); name .npy or HDF5 files, or subfolders, as "
                                "sources of their own")
            readers += _mrc_readers(files, options, skipped)
        elif kind == "mrc":
            readers += _mrc_readers([path], options, skipped)
        elif kind == "copick":
            reader = _CopickReader(path, options, copick or CopickOptions())
            warnings += reader.warnings
            readers.append(reader)
        elif kind in TABLE_SUFFIXES.values():
            readers.append(_TableReader(path, options, tables or TableOptions()))
        else:
            readers.append(_ArrayReader(path, kind, options))
    items = []
    for r, reader in enumerate(readers):
        if options.declared_voxel_size is not None and \
                not isinstance(reader, (_CopickReader, _TableReader)):
            reader.records = [replace(rec, voxel_size=float(options.declared_voxel_size))
                              for rec in reader.records]
        for i, record in enumerate(reader.records):
            if i == 0 or record.voxel_size != reader.records[0].voxel_size:
                check_voxel_size(record.voxel_size, options, record.source)
            items.append((r, i))
    if skipped:
        warnings += _skipped_warnings(skipped)
        if not items:
            raise InputError(f"no particles left: all {len(skipped)} MRC files were unreadable",
                             field="source")
    return ParticleSet(options, readers, items, warnings, [str(p) for p, _ in skipped])


def _mrc_readers(files: Sequence[Path], options: ReadOptions,
                 skipped: list[tuple[Path, str]]) -> list[_Reader]:
    """A reader per MRC file; with ``skip_unreadable`` a file that cannot be read as particles
    is added to ``skipped`` with the reason, instead of stopping everything."""
    readers: list[_Reader] = []
    for path in files:
        try:
            readers.append(_MrcReader(path, options))
        except InputError as exc:
            if not options.skip_unreadable:
                raise
            skipped.append((path, str(exc)))
    return readers


def _skipped_warnings(skipped: list[tuple[Path, str]], shown: int = 10) -> list[str]:
    lines = [f"skipped {reason}" for _, reason in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"skipped {len(skipped) - shown} more unreadable MRC files "
                     f"({len(skipped)} in all)")
    return lines


def load_particles(sources, **kwargs) -> tuple[np.ndarray, list[ParticleRecord]]:
    """Every particle of ``sources`` at once: (N, box, box, box) float32 and the records.

    What :attr:`ParticleSet.warnings` would hold (MRC files skipped with ``skip_unreadable``,
    entries of a folder that are not read, a copick run read at another voxel spacing) is
    issued as a :class:`UserWarning` each: with no set to hold them, they would be lost."""
    particles = open_particles(sources, **kwargs)
    for message in particles.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    try:
        batch = particles.read(particles.items)
    finally:
        particles.close()
    return batch.particles, batch.records


__all__ = ["MODEL_BOX", "MODEL_VOXEL_SIZE", "RECORD_COLUMNS", "Batch", "CopickOptions",
           "ParticleRecord", "ParticleSet", "ReadOptions", "TableOptions", "check_voxel_size", "conform",
           "cut_box", "fit_box", "fit_starts", "full_positions", "load_particles",
           "open_particles", "source_kind"]
