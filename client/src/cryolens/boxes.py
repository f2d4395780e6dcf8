"""Boxes and voxel sizes: the checks every particle passes, and conforming a read volume to the
model's box (crop or pad about the centre, resample to its voxel size); cutting a box around a
pick from a tomogram."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from cryolens.errors import InputError
from cryolens.records import CUT_FORMATS, VOXEL_TOLERANCE, ParticleRecord, ReadOptions


def voxel_from(value, where: str) -> float | None:
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
