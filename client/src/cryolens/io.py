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

The parts, each a module of its own: what a particle is and the options
(:mod:`cryolens.records`), checking and conforming boxes (:mod:`cryolens.boxes`), the file
readers (:mod:`cryolens.readers`) and those that cut boxes from tomograms
(:mod:`cryolens.cutreaders`); this module lists and reads them as one set. Their public names
are importable from here too.
"""
from __future__ import annotations

import hashlib
import math
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cryolens.boxes import (
    box_corner,
    check_3d,
    check_voxel_size,
    conform,
    cut_box,
    fit_box,
    fit_starts,
    full_positions,
    source_box,
)
from cryolens.cutreaders import CopickReader, CutReader, TableReader
from cryolens.errors import InputError
from cryolens.readers import ArrayReader, MrcReader, Reader
from cryolens.records import (
    CUT_FORMATS,
    HDF5_SUFFIXES,
    INSTALL_IO,
    MODEL_BOX,
    MODEL_VOXEL_SIZE,
    MRC_SUFFIXES,
    RECORD_COLUMNS,
    VOXEL_TOLERANCE,
    Batch,
    CopickOptions,
    ParticleRecord,
    ReadOptions,
    resolved,
)
from cryolens.tables.read import TABLE_SUFFIXES, TableOptions


# -- the set of particles -------------------------------------------------------------------------
@dataclass
class ParticleSet:
    """Every particle of some inputs, listed; read them with :meth:`batches`."""

    options: ReadOptions
    readers: list[Reader]
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
    readers: list[Reader] = []
    warnings: list[str] = []
    skipped: list[tuple[Path, str]] = []
    for source in sources:
        path = Path(source)
        if not path.exists():  # before its kind: a mistyped folder has no suffix to go by
            raise InputError(f"{source}: no such file or folder", field="source")
        kind = source_kind(path)
        if kind == "folder":
            readers += _folder_readers(path, options, skipped, warnings)
        elif kind == "mrc":
            readers += _mrc_readers([path], options, skipped)
        elif kind == "copick":
            reader = CopickReader(path, options, copick or CopickOptions())
            warnings += reader.warnings
            readers.append(reader)
        elif kind in TABLE_SUFFIXES.values():
            readers.append(TableReader(path, options, tables or TableOptions()))
        else:
            readers.append(ArrayReader(path, kind, options))
    items = []
    for r, reader in enumerate(readers):
        if options.declared_voxel_size is not None and \
                not isinstance(reader, CutReader):
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


def _folder_readers(path: Path, options: ReadOptions, skipped: list[tuple[Path, str]],
                    warnings: list[str]) -> list[Reader]:
    """A reader per MRC file of folder ``path``, in name order; a warning naming what else
    is there (not read)."""
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
    return _mrc_readers(files, options, skipped)


def _mrc_readers(files: Sequence[Path], options: ReadOptions,
                 skipped: list[tuple[Path, str]]) -> list[Reader]:
    """A reader per MRC file; with ``skip_unreadable`` a file that cannot be read as particles
    is added to ``skipped`` with the reason, instead of stopping everything."""
    readers: list[Reader] = []
    for path in files:
        try:
            readers.append(MrcReader(path, options))
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


# the names of the modules io reads with stay importable from here, as before they moved
__all__ = ["CUT_FORMATS", "HDF5_SUFFIXES", "INSTALL_IO", "MODEL_BOX", "MODEL_VOXEL_SIZE",
           "MRC_SUFFIXES", "RECORD_COLUMNS", "VOXEL_TOLERANCE", "Batch", "CopickOptions",
           "ParticleRecord", "ParticleSet", "ReadOptions", "TableOptions", "box_corner",
           "check_3d", "check_voxel_size", "conform", "cut_box", "fit_box", "fit_starts",
           "full_positions", "load_particles", "open_particles", "resolved", "source_box",
           "source_kind"]
