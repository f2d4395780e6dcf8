"""Procedural shape families: random instances of ellipsoids, shells, rods, rings, filaments, ...

Each family draws a fresh :class:`~cryolens.synth.Structure` from a generator, so a model
trained on them sees shapes, not a list; the simulator images them like real proteins.

Units. Coordinates are in Å, columns (x, y, z), centred on the weighted centre of mass; sizes
in the docstrings are in voxels of :data:`~cryolens.synth.VOXEL_SIZE_A` (10 Å). Solid parts are
points on a cubic lattice of one voxel (the simulator's 1-voxel blur makes that a smooth
density) weighing :data:`PROTEIN_WEIGHT` residues each, the density of protein; parts built from
real structures keep their residues. Shapes that run "through the box" (filaments, membranes)
are clipped to a ball of :data:`CLIP_RADIUS` voxels, a little more than half the 48-voxel box.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cryolens.synth import VOXEL_SIZE_A, Structure, load_structures, random_rotations

__all__ = [
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "TRAINING_FAMILIES",
    "make_instance",
]

#: Residues per lattice point (one voxel, 1000 Å^3; a residue occupies about 130 Å^3).
PROTEIN_WEIGHT = 7.5
#: Radius (voxels) beyond which shapes that would fill the box are cut off.
CLIP_RADIUS = 30.0
#: Step (voxels) along a curve when it is swept into a tube.
CURVE_STEP = 0.4

Generator = Callable[[np.random.Generator], Structure]


# -- building blocks ---------------------------------------------------------------------------
def _ball_offsets(radius: float) -> np.ndarray:
    """(K, 3) integer lattice offsets within ``radius`` voxels of the origin (at least one)."""
    r = int(np.ceil(radius))
    g = np.arange(-r, r + 1)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return pts[(pts * pts).sum(1) <= max(radius, 0.5) ** 2]


def _lattice(half_width: float) -> np.ndarray:
    """(K, 3) float lattice points (voxels) of the cube ``|x|, |y|, |z| <= half_width``."""
    g = np.arange(-np.floor(half_width), np.floor(half_width) + 1, dtype=np.float32)
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)


def _snap(points: np.ndarray) -> np.ndarray:
    """Points (voxels) rounded to the lattice, each lattice point once: a uniform density."""
    return np.unique(np.round(points).astype(np.int32), axis=0).astype(np.float32)


def _tube(curve: np.ndarray, radius: float) -> np.ndarray:
    """Lattice points within ``radius`` voxels of a densely sampled curve (M, 3)."""
    offsets = _ball_offsets(radius).astype(np.float32)
    centres = np.round(curve * 2) / 2  # half-voxel steps: fewer duplicates, same union
    centres = np.unique(centres, axis=0)
    return _snap((centres[:, None, :] + offsets[None]).reshape(-1, 3))


def _polyline(vertices: np.ndarray) -> np.ndarray:
    """Dense samples (every :data:`CURVE_STEP` voxels) along a polyline through ``vertices``."""
    out = []
    for a, b in zip(vertices[:-1], vertices[1:], strict=True):
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / CURVE_STEP)) + 1)
        out.append(a + (b - a) * np.linspace(0, 1, n)[:, None])
    return np.concatenate(out)


def _clip(points: np.ndarray, radius: float = CLIP_RADIUS) -> np.ndarray:
    return points[(points * points).sum(1) <= radius * radius]


def _structure(family: str, points: np.ndarray, weights: np.ndarray | None = None) -> Structure:
    """A Structure from points in voxels, centred on their weighted centre of mass."""
    if weights is None:
        weights = np.full(len(points), PROTEIN_WEIGHT, np.float32)
    coords = points.astype(np.float64) * VOXEL_SIZE_A
    coords -= (coords * weights[:, None]).sum(0) / weights.sum()
    return Structure(name=family, pdb_id="", coords=coords.astype(np.float32),
                     weights=weights.astype(np.float32))


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _subunit(rng: np.random.Generator, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """A compact piece of a real (training) structure: the residues nearest a random one.

    Returns points in voxels centred on their centre and their weights, randomly oriented.
    """
    small = [s for s in load_structures() if len(s.coords) >= high]
    s = small[rng.integers(len(small))]
    k = int(rng.integers(low, high + 1))
    seed_point = s.coords[rng.integers(len(s.coords))]
    order = np.argsort(((s.coords - seed_point) ** 2).sum(1))[:k]
    pts = s.coords[order].astype(np.float64) / VOXEL_SIZE_A
    pts -= pts.mean(0)
    pts = pts @ random_rotations(1, rng)[0].T
    return pts.astype(np.float32), s.weights[order].astype(np.float32)


# -- training families -----------------------------------------------------------------------
def ellipsoid(rng: np.random.Generator) -> Structure:
    """A solid ellipsoid, semi-axes 3-14 voxels."""
    axes = rng.uniform(3, 14, 3)
    p = _lattice(axes.max())
    return _structure("ellipsoid", p[((p / axes) ** 2).sum(1) <= 1])


def shell(rng: np.random.Generator) -> Structure:
    """A hollow ellipsoidal shell (a capsid, a vesicle), radius 7-19, wall 1-3.5 voxels, with
    up to 12 round pores."""
    radius = rng.uniform(7, 19)
    axes = radius * rng.uniform(0.8, 1.2, 3)
    wall = rng.uniform(1.0, 3.5)
    p = _lattice(axes.max() + 1)
    r = np.sqrt(((p / axes) ** 2).sum(1)) * radius  # roughly a distance in voxels
    p = p[np.abs(r - radius) <= wall / 2]
    for _ in range(rng.integers(0, 13) if rng.random() < 0.5 else 0):
        centre = _random_unit(rng) * radius
        p = p[((p - centre) ** 2).sum(1) > rng.uniform(2, 5) ** 2]
    return _structure("shell", p)


def rod(rng: np.random.Generator) -> Structure:
    """A straight cylinder, radius 1.5-6 voxels, length 8-70 (a long one crosses the box)."""
    radius = rng.uniform(1.5, 6)
    half = rng.uniform(4, 35)
    curve = _polyline(np.array([[0, 0, -half], [0, 0, half]], np.float32))
    return _structure("rod", _clip(_tube(curve, radius)))


def lobes(rng: np.random.Generator) -> Structure:
    """A multi-lobed assembly: 2-7 touching balls of radius 2.5-8 voxels."""
    n = int(rng.integers(2, 8))
    radii = rng.uniform(2.5, 8, n)
    centres = [np.zeros(3)]
    for i in range(1, n):
        anchor = centres[rng.integers(i)]
        j = len(centres) - 1
        centres.append(anchor + _random_unit(rng) * (radii[j] + radii[i]) * rng.uniform(0.6, 0.9))
    parts = [c + _ball_offsets(r) for c, r in zip(centres, radii, strict=True)]
    return _structure("lobes", _snap(np.concatenate(parts)))


def oligomer(rng: np.random.Generator) -> Structure:
    """A cyclic (C2-C8) or dihedral assembly of a real subunit of 60-400 residues."""
    pts, w = _subunit(rng, 60, 400)
    n = int(rng.integers(2, 9))
    extent = np.sqrt((pts * pts).sum(1)).max()
    radius = extent / np.sin(np.pi / n) * rng.uniform(0.7, 1.0) if n > 2 else extent * 0.8
    copies, weights = [], []
    for flip in (1, -1) if rng.random() < 0.3 else (1,):
        for i in range(n):
            a = 2 * np.pi * i / n
            rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            q = (pts + [radius, 0, extent * 0.9 * (flip < 0)]) @ rz.T
            if flip < 0:
                q = q * [1, -1, -1]  # a 2-fold about x: the dihedral partner ring
            copies.append(q)
            weights.append(w)
    return _structure("oligomer", np.concatenate(copies), np.concatenate(weights))


def _polyhedron(kind: str) -> np.ndarray:
    """Unit-circumradius vertices of a platonic solid."""
    phi = (1 + 5**0.5) / 2
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    if kind == "tetrahedron":
        v = signs[np.prod(signs, 1) > 0]
    elif kind == "cube":
        v = signs
    elif kind == "octahedron":
        v = np.concatenate([np.eye(3), -np.eye(3)])
    else:  # icosahedron
        v = []
        for a in (-1, 1):
            for b in (-phi, phi):
                v += [[0, a, b], [a, b, 0], [b, 0, a]]
        v = np.array(v, float)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cage(rng: np.random.Generator) -> Structure:
    """The edges of a platonic solid as struts, circumradius 8-20, strut radius 0.8-2.2 voxels."""
    kind = ("tetrahedron", "cube", "octahedron", "icosahedron")[rng.integers(4)]
    v = _polyhedron(kind) * rng.uniform(8, 20)
    d = np.linalg.norm(v[:, None] - v[None], axis=-1)
    shortest = d[d > 1e-6].min()
    edges = [(i, j) for i in range(len(v)) for j in range(i + 1, len(v))
             if d[i, j] < shortest * 1.01]
    curve = np.concatenate([_polyline(v[[i, j]]) for i, j in edges])
    return _structure("cage", _tube(curve, rng.uniform(0.8, 2.2)))


def membrane(rng: np.random.Generator) -> Structure:
    """A curved lipid bilayer patch through the box (spherical or cylindrical curvature, radius
    15-200 voxels, or flat): two head-group sheets 3.5-4.5 voxels apart and a lighter core;
    half of them carry 1-4 embedded real protein pieces."""
    p = _lattice(CLIP_RADIUS)
    p = _clip(p)
    curvature = 0.0 if rng.random() < 0.25 else 1 / rng.uniform(15, 200)
    r = 1 / curvature if curvature else 0.0
    if curvature == 0:
        d = p[:, 2]
    elif rng.random() < 0.5:  # a sphere of radius r whose surface passes through the origin
        d = r - np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + (p[:, 2] - r) ** 2)
    else:  # a cylinder along x
        d = r - np.sqrt(p[:, 1] ** 2 + (p[:, 2] - r) ** 2)
    gap = rng.uniform(3.5, 4.5) / 2
    heads = np.abs(np.abs(d) - gap) <= 0.6
    core = np.abs(d) < gap - 0.6
    points = [p[heads], p[core]]
    weights = [np.full(heads.sum(), PROTEIN_WEIGHT * 0.8),
               np.full(core.sum(), PROTEIN_WEIGHT * 0.4)]
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 5)):
            pts, w = _subunit(rng, 80, 400)
            surface = p[heads][rng.integers(heads.sum())]
            points.append(pts + surface)
            weights.append(w)
    return _structure("membrane", np.concatenate(points),
                      np.concatenate(weights).astype(np.float32))


def worm(rng: np.random.Generator) -> Structure:
    """A tube along a random smooth space curve (3 Fourier modes per axis), radius 1.2-4.5
    voxels, 20-80 voxels long, clipped to the box."""
    t = np.linspace(0, 1, 400)
    k = np.arange(1, 4)
    coef = rng.standard_normal((3, 2, 3)) / k[None, None, :] ** 1.5
    curve = (coef[:, 0, :, None] * np.sin(np.pi * k[:, None] * t)
             + coef[:, 1, :, None] * np.cos(np.pi * k[:, None] * t)).sum(1).T
    curve += np.outer(t - 0.5, _random_unit(rng)) * rng.uniform(0, 3)
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1).sum()
    curve = curve * rng.uniform(20, 80) / seg
    curve -= curve.mean(0)
    dense = _polyline(curve.astype(np.float32))
    return _structure("worm", _clip(_tube(dense, rng.uniform(1.2, 4.5))))


# -- held-out families -----------------------------------------------------------------------
def ring(rng: np.random.Generator) -> Structure:
    """A torus (slightly elliptical), major radius 6-16, minor radius 1.5-4.5 voxels."""
    big = rng.uniform(6, 16)
    a = np.linspace(0, 2 * np.pi, int(2 * np.pi * big / CURVE_STEP) + 2)
    stretch = rng.uniform(1.0, 1.25)
    curve = np.stack([big * stretch * np.cos(a), big * np.sin(a), np.zeros_like(a)], 1)
    return _structure("ring", _tube(curve.astype(np.float32), rng.uniform(1.5, 4.5)))


def filament(rng: np.random.Generator) -> Structure:
    """A helical filament through the box: 1 or 2 strands of radius 1.2-3.5 voxels on a helix of
    radius 2-8 and pitch 10-35 voxels along z, clipped to the box."""
    radius = rng.uniform(2, 8)
    pitch = rng.uniform(10, 35)
    z = np.arange(-CLIP_RADIUS - 5, CLIP_RADIUS + 5, CURVE_STEP / 4)
    strands = []
    for phase in np.arange(int(rng.integers(1, 3))) * np.pi:
        a = 2 * np.pi * z / pitch + phase
        strands.append(np.stack([radius * np.cos(a), radius * np.sin(a), z], 1))
    curve = np.concatenate(strands).astype(np.float32)
    return _structure("filament", _clip(_tube(curve, rng.uniform(1.2, 3.5))))


#: Every family by name, in a fixed order (the label order of evaluations).
FAMILIES: dict[str, Generator] = {
    "ellipsoid": ellipsoid, "shell": shell, "rod": rod, "lobes": lobes, "oligomer": oligomer,
    "cage": cage, "membrane": membrane, "worm": worm, "ring": ring, "filament": filament,
}
#: Families that never appear in training: the evaluation's test of generalisation.
HELD_OUT_FAMILIES = ("ring", "filament")
TRAINING_FAMILIES = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)


def make_instance(family: str, rng: np.random.Generator) -> Structure:
    """One random instance of ``family`` (a name in :data:`FAMILIES`)."""
    try:
        generator = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}") from None
    return generator(rng)


def instances(families: Sequence[str], rng: np.random.Generator) -> list[Structure]:
    """One instance of each family named, drawn in order from ``rng``."""
    return [make_instance(f, rng) for f in families]
