"""Readers of particle files: one MRC/MRCS file, or a ``.npy``, HDF5 or zarr array. A reader
lists its particles' records up front from headers alone, and reads their voxels on demand;
:mod:`cryolens.cutreaders` has the readers that cut boxes from tomograms."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from cryolens import formats
from cryolens.boxes import check_3d, voxel_from
from cryolens.errors import InputError
from cryolens.records import INSTALL_IO, ParticleRecord, ReadOptions


class Reader:
    """One input file (or project): ``records`` are known up front, ``read(locals)`` loads."""

    records: list[ParticleRecord]

    def read(self, items: Sequence[int]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose size and modification time tell whether the input changed."""
        return [self.path]

    def close(self) -> None:
        pass


class MrcReader(Reader):
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
        voxel = None if options.declared_voxel_size is not None else voxel_from(sizes, str(path))
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


class ArrayReader(Reader):
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
                voxel = voxel_from(attrs[key], f"{path} attribute {key}")
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
