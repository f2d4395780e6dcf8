"""Readers that cut boxes from tomograms: around the picks of a copick project, or the rows of
a particle table (:mod:`cryolens.tables`); placed and rounded the same way."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cryolens.boxes import box_corner, check_voxel_size, cut_box, full_positions, source_box
from cryolens.errors import InputError
from cryolens.readers import Reader
from cryolens.records import (
    INSTALL_IO,
    TABLE_SUFFIXES,
    VOXEL_TOLERANCE,
    CopickOptions,
    ParticleRecord,
    ReadOptions,
)
from cryolens.tables.read import TableOptions


class CutReader(Reader):
    """Boxes cut around picks from their tomograms, each box placed by its record's origin and
    filled with the tomogram's mean past its edge. The last tomogram read is kept while the
    next picks are in it (``_cached``)."""

    options: ReadOptions
    _cached: tuple | None = None

    def voxels(self, record: ParticleRecord) -> tuple[np.ndarray, float]:  # pragma: no cover
        """The voxels (z, y, x) of the tomogram ``record`` was picked in, and their mean."""
        raise NotImplementedError

    def read(self, items: Sequence[int]) -> list[np.ndarray]:
        out = []
        for item in items:
            record = self.records[item]
            data, mean = self.voxels(record)
            side = source_box(record.voxel_size, self.options)
            lo = [round(o / record.voxel_size)
                  for o in (record.origin_z, record.origin_y, record.origin_x)]
            out.append(cut_box(data, lo, side, mean))
        return out

    def close(self) -> None:
        self._cached = None


class CopickReader(CutReader):
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

    def voxels(self, record: ParticleRecord) -> tuple[np.ndarray, float]:
        return self._tomogram(record.run)


class TableReader(CutReader):
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

    def voxels(self, record: ParticleRecord) -> tuple[np.ndarray, float]:
        if self._cached is None or self._cached[0] != record.tomogram:
            self._cached = None
            try:
                data = self.tomograms[record.tomogram].data()
                mean = float(data.mean(dtype=np.float64))
            except (ValueError, OSError) as exc:
                raise InputError(f"tomogram {record.tomogram}: cannot read its voxels: "
                                 f"{exc}", field="tomograms") from exc
            self._cached = (record.tomogram, data, mean)
        return self._cached[1], self._cached[2]
