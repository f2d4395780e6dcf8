"""A row's particle read again from its source, as ``cryolens embed`` read it: the file and
index (MRC, HDF5, zarr, ``.npy``) or the box cut around a copick pick, with the table's read
options (rescale, fit, voxel size), conformed to the model's box.

A copick box is cut from the tomogram's zarr array directly (only the box's chunks are read),
padded past the edge with the tomogram's mean as ``cryolens.io`` pads it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

import numpy as np

from cryolens.errors import InputError
from cryolens.explore.errors import NoSource
from cryolens.io import (
    RECORD_COLUMNS,
    ParticleRecord,
    ReadOptions,
    conform,
    open_particles,
    source_box,
)

#: Particles kept in memory (48^3 float32 each: 0.44 MB).
KEEP_PARTICLES = 256
#: Open inputs (files, copick tomograms) kept between requests.
KEEP_OPEN = 16
#: Planes of a tomogram read at a time when its mean is needed (an edge box's padding).
MEAN_SLAB = 16


def read_options(meta: dict) -> ReadOptions:
    """The read options the table was embedded with (its ``cryolens`` metadata), else the
    defaults."""
    known = {f.name for f in fields(ReadOptions)}
    given = {k: v for k, v in (meta.get("identity", {}).get("read") or {}).items() if k in known}
    if meta.get("box_size"):
        given["box"] = int(meta["box_size"])
    return ReadOptions(**given)


class ParticleSource:
    """:meth:`volume` reads row ``i``'s particle from ``rows(i)`` (a dict of its columns)."""

    def __init__(self, row_values, options: ReadOptions) -> None:
        self.row_values, self.options = row_values, options
        self._particles: OrderedDict[int, np.ndarray] = OrderedDict()
        self._open: OrderedDict[tuple, object] = OrderedDict()
        self._means: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def volume(self, row: int) -> np.ndarray:
        """(box, box, box) float32, z-y-x, as the model saw it (before its z-score)."""
        with self._lock:
            if row in self._particles:
                self._particles.move_to_end(row)
                return self._particles[row]
            record = self._record(row)
            try:
                volume = self._copick(record) if record.format == "copick" else \
                    self._file(record)
            except NoSource:
                raise
            except (InputError, OSError, KeyError, ValueError) as exc:
                raise NoSource(f"row {row}: cannot read its particle from {record.source}: "
                               f"{exc}", field="row") from exc
            self._particles[row] = volume
            while len(self._particles) > KEEP_PARTICLES:
                self._particles.popitem(last=False)
            return volume

    def _record(self, row: int) -> ParticleRecord:
        values = self.row_values(row)
        missing = [c for c in ("source", "index", "format") if values.get(c) is None]
        if missing:
            raise NoSource(f"row {row} has no {', '.join(missing)}: the table does not say "
                           "where its particle came from", field="row")
        if not Path(values["source"]).exists():
            raise NoSource(f"row {row}: its source {values['source']} is gone (no such file)",
                           field="row")
        return ParticleRecord(**{k: values[k] for k in RECORD_COLUMNS if k in values})

    def _keep(self, key: tuple, make):
        if key not in self._open:
            self._open[key] = make()
            while len(self._open) > KEEP_OPEN:
                _, old = self._open.popitem(last=False)
                getattr(old, "close", lambda: None)()
        self._open.move_to_end(key)
        return self._open[key]

    def _file(self, record: ParticleRecord) -> np.ndarray:
        particles = self._keep(("file", record.source),
                               lambda: open_particles([record.source], self.options))
        if not 0 <= record.index < len(particles):
            raise NoSource(f"{record.source} holds {len(particles)} particles now, not particle "
                           f"{record.index}", field="row")
        return particles.read([particles.items[record.index]]).particles[0]

    def _copick(self, record: ParticleRecord) -> np.ndarray:
        key = (record.source, record.run, record.voxel_size, record.tomo_type)
        array = self._keep(("copick", *key), lambda: _tomogram(record))
        side = source_box(record.voxel_size, self.options)
        lo = [round(o / record.voxel_size)
              for o in (record.origin_z, record.origin_y, record.origin_x)]
        window = tuple(slice(max(a, 0), min(a + side, n)) for a, n in zip(lo, array.shape,
                                                                          strict=True))
        if all(w.stop > w.start for w in window):
            inside = np.asarray(array[window], np.float32)
        else:
            inside = np.zeros((0, 0, 0), np.float32)
        if inside.shape == (side,) * 3:
            box = inside
        else:  # past the tomogram's edge: padded with its mean, as cryolens.io pads it
            if key not in self._means:
                self._means[key] = _mean(array)
            box = np.full((side,) * 3, self._means[key], np.float32)
            if inside.size:
                box[tuple(slice(w.start - a, w.stop - a) for w, a in zip(window, lo,
                                                                         strict=True))] = inside
        volume, _ = conform(box, record, self.options)
        return volume


def _tomogram(record: ParticleRecord):
    """The zarr array (z, y, x) of the tomogram a copick row was cut from."""
    import copick
    import zarr

    root = copick.from_file(record.source)
    run = root.get_run(record.run)
    if run is None:
        raise NoSource(f"{record.source} has no run {record.run!r} now", field="row")
    spacing = run.get_voxel_spacing(record.voxel_size)
    tomograms = [] if spacing is None else \
        [t for t in spacing.tomograms if t.tomo_type == record.tomo_type]
    tomogram = tomograms[0] if tomograms else None
    if tomogram is None:
        raise NoSource(f"{record.source} run {record.run} has no {record.tomo_type!r} tomogram "
                       f"at {record.voxel_size:g} A now", field="row")
    return zarr.open(tomogram.zarr(), mode="r")["0"]


def _mean(array) -> float:
    total = 0.0
    for start in range(0, array.shape[0], MEAN_SLAB):
        total += float(np.asarray(array[start:start + MEAN_SLAB], np.float32).sum(
            dtype=np.float64))
    return total / float(np.prod(array.shape))


__all__ = ["ParticleSource", "read_options"]
