"""Each particle table's coordinate convention, both ways: table columns to positions in a
tomogram, and positions back to columns (sources in ``docs/tables.md``).

A *position* here is continuous, in voxels of the tomogram, 0-based with each voxel's centre
on an integer: the first voxel's centre is 0 and the particle's box centre is the voxel
``floor(position + 0.5)``, as for copick picks (angstrom divided by the voxel size). Arrays are
(N, 3) float64, columns x, y, z; ``shape`` is a tomogram's (z, y, x) voxels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: RELION 5: coordinates in angstrom from the tomogram's centre, which is voxel n / 2.
RELION_CENTERED = tuple(f"rlnCenteredCoordinate{a}Angst" for a in "XYZ")
#: RELION 3/4, Warp: coordinates in pixels from the first voxel's centre.
RELION_PIXEL = tuple(f"rlnCoordinate{a}" for a in "XYZ")
#: Shifts that RELION subtracts from the coordinate (angstrom; pixels in RELION 3.0).
RELION_ORIGIN_ANGST = tuple(f"rlnOrigin{a}Angst" for a in "XYZ")
RELION_ORIGIN_PIXEL = tuple(f"rlnOrigin{a}" for a in "XYZ")
#: RELION 5's per-particle frame that the shifts are given in (rot, tilt, psi, degrees).
RELION_SUBTOMOGRAM = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt",
                      "rlnTomoSubtomogramPsi")
DYNAMO_POSITION = ("x", "y", "z")  # columns 24-26: 1-based pixel indices
DYNAMO_SHIFT = ("dx", "dy", "dz")  # columns 4-6: added to the position
#: IMOD model points: x and y put a pixel's centre at index + 0.5, z a section's at its index.
IMOD_OFFSET = np.array([0.5, 0.5, 0.0])


def relion_matrices(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices of RELION's ZYZ Euler angles in degrees, as RELION builds
    them (``Euler_angles2matrix``)."""
    a, b, g = (np.radians(np.asarray(v, np.float64)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack([
        np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        np.stack([sc, ss, cb], -1),
    ], -2)


def relion_shifts(origin_angstrom: np.ndarray, subtomogram_angles: np.ndarray | None
                  ) -> np.ndarray:
    """(N, 3) shifts in angstrom in the tomogram's frame: the rows' ``rlnOrigin*Angst``,
    turned by RELION 5's subtomogram rotation when the table has one."""
    if subtomogram_angles is None:
        return origin_angstrom
    matrices = relion_matrices(*np.asarray(subtomogram_angles, np.float64).T)
    return np.einsum("nij,nj->ni", matrices, origin_angstrom)


def relion_centered_to_position(centered_angstrom: np.ndarray, shifts_angstrom: np.ndarray,
                                voxel_size: np.ndarray, shape_xyz: np.ndarray) -> np.ndarray:
    """RELION 5: voxel = (centred angstrom - shift) / voxel size + n / 2 on each axis."""
    return (centered_angstrom - shifts_angstrom) / voxel_size[:, None] + shape_xyz / 2.0


def position_to_relion_centered(position: np.ndarray, voxel_size: np.ndarray,
                                shape_xyz: np.ndarray) -> np.ndarray:
    """The inverse of :func:`relion_centered_to_position`, without shifts."""
    return (position - shape_xyz / 2.0) * voxel_size[:, None]


def relion_pixel_to_position(pixels: np.ndarray, shifts_angstrom: np.ndarray,
                             pixel_size: np.ndarray, voxel_size: np.ndarray) -> np.ndarray:
    """RELION 3/4 and Warp: (coordinate x pixel size - shift) in angstrom, over the voxel size."""
    return (pixels * pixel_size[:, None] - shifts_angstrom) / voxel_size[:, None]


def dynamo_to_position(xyz: np.ndarray, shifts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Dynamo: 1-based pixel index plus shift, times (table pixel / tomogram voxel)."""
    return (xyz + shifts - 1.0) * scale[:, None]


def position_to_dynamo(position: np.ndarray) -> np.ndarray:
    return position + 1.0


def imod_to_position(xyz: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """IMOD: x and y less half a pixel, z as it is, times (model pixel / tomogram voxel)."""
    return (xyz - IMOD_OFFSET) * scale[:, None]


def box_centres(position: np.ndarray) -> np.ndarray:
    """(N, 3) int64: the voxel each position falls in, halves rounded up (as for copick)."""
    return np.floor(position + 0.5).astype(np.int64)


def outside(centres: np.ndarray, shape_xyz: np.ndarray) -> np.ndarray:
    """(N,) bool: box centres not in the tomogram."""
    return np.any((centres < 0) | (centres >= shape_xyz), axis=1)


def shape_xyz(shapes_zyx: Sequence[tuple[int, int, int]]) -> np.ndarray:
    return np.array([s[::-1] for s in shapes_zyx], np.float64).reshape(-1, 3)


__all__ = ["DYNAMO_POSITION", "DYNAMO_SHIFT", "IMOD_OFFSET", "RELION_CENTERED",
           "RELION_ORIGIN_ANGST", "RELION_ORIGIN_PIXEL", "RELION_PIXEL", "RELION_SUBTOMOGRAM",
           "box_centres", "dynamo_to_position", "imod_to_position", "outside",
           "position_to_dynamo", "position_to_relion_centered", "relion_centered_to_position",
           "relion_matrices", "relion_pixel_to_position", "relion_shifts", "shape_xyz"]
