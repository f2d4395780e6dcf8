"""Fast synthetic cryo-ET subtomograms of real, coarse-grained macromolecules.

Feeds training and evaluation with particles whose structure, pose and clean density are known.

Geometry. Volumes are ``(48, 48, 48)`` arrays with axes ``[d, h, w] = [z, y, x]``; the box
centre is voxel ``(box - 1) / 2`` on every axis. A structure point at ``(x, y, z)`` Å, after the
active rotation ``R`` (``r' = R @ r``), lands at voxel
``(c + z'/voxel_size + shift_z, c + y'/voxel_size + shift_y, c + x'/voxel_size + shift_x)``.

Density. Each point adds ``weight * exp(-|v - v_point|^2 / (2 blur^2))`` (``v`` in voxels), a
separable Gaussian, computed as three ``(M, box)`` 1-D profiles contracted plane by plane.

Imaging model, applied in this order to the density ``rho`` (protein positive):

1. contrast: ``signal0 = -rho`` for ``"dark"`` (protein darker than ice), ``+rho`` for ``"light"``;
   ``clean`` is ``signal0`` z-scored (no wedge, no band-pass, no noise).
2. ``signal = F^-1[W * B * F[signal0]]`` where ``W`` is the missing-wedge mask and ``B`` the
   optional band-pass. ``W`` zeroes, for a single-axis tilt series about y (the h axis) over
   ``±tilt_range`` degrees, every Fourier component with ``|kz| > |kx| tan(tilt_range)``; the
   ``k = 0`` term is kept. ``B`` passes spatial frequencies ``low <= |k| <= high`` (1/Å) with
   raised-cosine edges one Fourier pixel (``1 / (box * voxel_size)``) wide; ``low = 0`` keeps
   the mean.
3. noise: white Gaussian noise ``n``, wedge-filtered like the signal (``noise = F^-1[W * F[n]]``;
   a real tomogram's noise lacks the wedge too, but not the CTF), scaled so that

       SNR = var(signal) / var(noise)

   where both variances are taken over the ``box^3`` voxels of the one particle (computed
   exactly from the spectra by Parseval). ``snr=None`` adds no noise.
4. ``particles = zscore(signal + noise)``, per particle (mean 0, standard deviation 1).

Randomness comes from one ``np.random.Generator`` seeded at construction: per ``sample`` call
labels, then rotations, then shifts for the whole batch, then the noise. The poses of a batch
therefore do not depend on ``snr``.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import scipy.fft

__all__ = [
    "ParticleBatch",
    "ParticleSimulator",
    "Structure",
    "load_structures",
    "quaternion_to_matrix",
    "random_rotations",
]

BOX_SIZE = 48
VOXEL_SIZE_A = 10.0
DEFAULT_SNR = 5.0
DEFAULT_TILT_RANGE_DEG = 60.0
DEFAULT_MAX_SHIFT_VOXELS = 2.0
DEFAULT_BLUR_VOXELS = 1.0
# Gaussian profiles are evaluated only within this many sigmas of a point: exp(-12.5) ~ 4e-6.
PROFILE_HALF_WIDTH_SIGMAS = 5.0
# Particles are filtered this many at a time: bounds the FFT temporaries (~14 MB per 16).
FFT_CHUNK = 16
CONTRASTS = ("dark", "light")


@dataclass(frozen=True)
class Structure:
    """A coarse-grained macromolecule: one point per residue (or per merged group of residues)."""

    name: str
    pdb_id: str
    coords: np.ndarray  # (M, 3) float32, Å, centred on the centre of mass, columns (x, y, z)
    weights: np.ndarray  # (M,) float32, amino-acid equivalents (nucleotide = 3)


@dataclass
class ParticleBatch:
    """Simulated particles with their ground truth."""

    particles: np.ndarray  # (N, 48, 48, 48) float32, z-y-x, z-scored per particle
    clean: np.ndarray  # (N, 48, 48, 48) float32, no wedge/band-pass/noise, same sign, z-scored
    rotations: np.ndarray  # (N, 3, 3) float32, active rotation of (x, y, z) column vectors
    shifts: np.ndarray  # (N, 3) float32, voxels, order (z, y, x)
    labels: np.ndarray  # (N,) int64, index into ``names``
    names: list[str]  # structure names, one per structure of the simulator


@functools.lru_cache(maxsize=1)
def _packaged_structures() -> tuple[Structure, ...]:
    data = resources.files("cryolens.data")
    meta = json.loads((data / "structures.json").read_text())
    pdb_ids = {rec["name"]: rec["pdb_id"] for rec in meta["structures"]}
    with (data / "structures.npz").open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        names = [str(n) for n in npz["names"]]
        out = []
        for name in names:
            coords = np.ascontiguousarray(npz[f"coords_{name}"], dtype=np.float32)
            weights = np.ascontiguousarray(npz[f"weights_{name}"], dtype=np.float32)
            coords.flags.writeable = False  # shared by every caller through the cache
            weights.flags.writeable = False
            out.append(Structure(name=name, pdb_id=pdb_ids[name], coords=coords, weights=weights))
    return tuple(out)


def load_structures() -> list[Structure]:
    """The packaged structures (``cryolens/data/structures.npz``), read once and cached."""
    return list(_packaged_structures())


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """(N, 4) unit quaternions (w, x, y, z) -> (N, 3, 3) active rotations of column vectors."""
    w, x, y, z = np.moveaxis(np.asarray(q, dtype=np.float64), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def random_rotations(n: int, rng: np.random.Generator, max_angle: float | None = None
                     ) -> np.ndarray:
    """(n, 3, 3) float64 rotations uniform on SO(3) (normalised 4-D Gaussian quaternions).

    ``max_angle`` (degrees) keeps only rotations by at most that angle from the identity, with
    the uniform (Haar) density restricted to that ball (rejection sampling).
    """
    if max_angle is None or max_angle >= 180:
        q = rng.standard_normal((n, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        return quaternion_to_matrix(q)
    if not max_angle > 0:
        raise ValueError(f"max_angle must be > 0 degrees, got {max_angle}")
    limit = np.cos(np.deg2rad(max_angle) / 2)  # |w| of a rotation by exactly max_angle
    kept: list[np.ndarray] = []
    count = 0
    while count < n:
        q = rng.standard_normal((4 * n + 64, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        q = q[np.abs(q[:, 0]) >= limit]
        kept.append(q)
        count += len(q)
    return quaternion_to_matrix(np.concatenate(kept)[:n])


@functools.lru_cache(maxsize=16)
def _fourier_masks(box: int, voxel_size: float, tilt_range: float | None,
                   bandpass: tuple[float, float] | None
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Wedge and band-pass masks, (box, box, box // 2 + 1) float32 in rfftn layout (or None)."""
    kz = np.fft.fftfreq(box)[:, None, None]  # cycles per voxel
    ky = np.fft.fftfreq(box)[None, :, None]
    kx = np.fft.rfftfreq(box)[None, None, :]
    shape = (box, box, box // 2 + 1)
    wedge = None
    if tilt_range is not None:
        t = np.deg2rad(tilt_range)
        # |kz| > |kx| tan(t), written without tan so that t = 90 degrees means "no wedge".
        missing = np.abs(kz) * np.cos(t) > np.abs(kx) * np.sin(t)
        wedge = np.broadcast_to(~missing, shape).astype(np.float32)
    band = None
    if bandpass is not None:
        low, high = bandpass
        k = np.sqrt(kz**2 + ky**2 + kx**2) / voxel_size  # 1/Å
        edge = 1.0 / (box * voxel_size)

        def ramp(t: np.ndarray) -> np.ndarray:  # 0 -> 1 over t in [-0.5, 0.5], smooth
            return 0.5 - 0.5 * np.cos(np.pi * np.clip(t + 0.5, 0.0, 1.0))

        band = ramp((high - k) / edge)
        if low > 0:
            band = band * ramp((k - low) / edge)
        band = band.astype(np.float32)
    for mask in (wedge, band):
        if mask is not None:
            mask.flags.writeable = False
    return wedge, band


@functools.lru_cache(maxsize=4)
def _parseval_weights(box: int) -> np.ndarray:
    """(box // 2 + 1,) multiplicity of each rfft column in the full spectrum."""
    w = np.full(box // 2 + 1, 2.0, dtype=np.float32)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def _spectral_variance(spectrum: np.ndarray, box: int) -> np.ndarray:
    """(N,) variance over the box of the real volumes whose rfftn is (N, box, box, box//2+1)."""
    power = spectrum.real**2 + spectrum.imag**2
    total = (power * _parseval_weights(box)).sum(axis=(1, 2, 3), dtype=np.float64)
    total -= power[:, 0, 0, 0]  # the mean does not count
    return total / float(box**3) ** 2


def _zscore(volumes: np.ndarray) -> np.ndarray:
    """Per-volume (x - mean) / std along all but the first axis, in place, float32."""
    axes = tuple(range(1, volumes.ndim))
    mean = volumes.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = volumes.std(axis=axes, keepdims=True, dtype=np.float64)
    volumes -= mean.astype(np.float32)
    volumes /= np.where(std > 0, std, 1.0).astype(np.float32)
    return volumes


class ParticleSimulator:
    """Random particles of a set of structures: pose, contrast, missing wedge, band-pass, noise.

    See the module docstring for the exact imaging model and the SNR definition. ``blur`` and
    ``max_shift`` are in voxels, ``voxel_size`` in Å, ``tilt_range`` in degrees (``None``: no
    wedge), ``bandpass`` a pair of spatial frequencies in 1/Å (``None``: none), ``max_angle``
    in degrees: poses within that angle of the identity only (``None``: all of SO(3)).
    """

    def __init__(self, structures: Sequence[Structure] | None = None, *, box_size: int = BOX_SIZE,
                 voxel_size: float = VOXEL_SIZE_A, snr: float | None = DEFAULT_SNR,
                 tilt_range: float | None = DEFAULT_TILT_RANGE_DEG,
                 max_shift: float = DEFAULT_MAX_SHIFT_VOXELS, contrast: str = "dark",
                 bandpass: tuple[float, float] | None = None, blur: float = DEFAULT_BLUR_VOXELS,
                 max_angle: float | None = None, seed: int = 0) -> None:
        self.structures = tuple(load_structures() if structures is None else structures)
        if not self.structures:
            raise ValueError("need at least one structure")
        if box_size < 2:
            raise ValueError(f"box_size must be >= 2, got {box_size}")
        if voxel_size <= 0 or blur <= 0:
            raise ValueError(f"voxel_size and blur must be > 0, got {voxel_size}, {blur}")
        if snr is not None and not snr > 0:
            raise ValueError(f"snr must be > 0 or None, got {snr}")
        if tilt_range is not None and not 0 < tilt_range <= 90:
            raise ValueError(f"tilt_range must be in (0, 90] degrees or None, got {tilt_range}")
        if max_angle is not None and not max_angle > 0:
            raise ValueError(f"max_angle must be > 0 degrees or None, got {max_angle}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        if contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
        if bandpass is not None:
            bandpass = (float(bandpass[0]), float(bandpass[1]))
            if not 0 <= bandpass[0] < bandpass[1]:
                raise ValueError("bandpass must be (low, high) 1/Å with 0 <= low < high, "
                                 f"got {bandpass}")
        self.box_size = int(box_size)
        self.voxel_size = float(voxel_size)
        self.snr = None if snr is None else float(snr)
        self.tilt_range = None if tilt_range is None else float(tilt_range)
        self.max_shift = float(max_shift)
        self.max_angle = None if max_angle is None else float(max_angle)
        self.contrast = contrast
        self.bandpass = bandpass
        self.blur = float(blur)
        self.names = [s.name for s in self.structures]
        self.rng = np.random.default_rng(seed)
        self._wedge, band = _fourier_masks(self.box_size, self.voxel_size,
                                           self.tilt_range, self.bandpass)
        self._signal_filter = _combine(self._wedge, band)
        self._grid = np.arange(self.box_size, dtype=np.float32)

    # -- rendering -------------------------------------------------------------------------
    def render(self, structure_index: int, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Clean density (box, box, box) float32, z-y-x, protein positive, not normalised.

        ``rotation`` (3, 3) acts on (x, y, z) column vectors; ``shift`` (3,) voxels (z, y, x).
        """
        s = self.structures[structure_index]
        rot = np.asarray(rotation, dtype=np.float32)
        shift = np.asarray(shift, dtype=np.float32)
        centre = (self.box_size - 1) / 2.0
        # Columns of pos are voxel coordinates along (d, h, w) = (z, y, x).
        pos = (s.coords @ rot.T)[:, ::-1] / np.float32(self.voxel_size) + (centre + shift)
        order = np.argsort(pos[:, 0], kind="stable")
        pos = pos[order]
        diff = (self._grid[None, None, :] - pos[:, :, None]) / np.float32(self.blur)
        profiles = np.exp(np.float32(-0.5) * diff * diff)  # (M, 3, box)
        pz = np.ascontiguousarray(profiles[:, 0, :].T) * s.weights[order]  # (box, M), weighted
        py_t = np.ascontiguousarray(profiles[:, 1, :].T)  # (box, M)
        px = np.ascontiguousarray(profiles[:, 2, :])  # (M, box)
        # Plane k only sees points within a few sigmas of it in z; points are sorted by z, so
        # that is a contiguous slice and each plane is one small matmul (5x less work than
        # the dense (box, M) @ (M, box^2) contraction).
        reach = PROFILE_HALF_WIDTH_SIGMAS * self.blur
        lo = np.searchsorted(pos[:, 0], self._grid - reach, side="left")
        hi = np.searchsorted(pos[:, 0], self._grid + reach, side="right")
        volume = np.zeros((self.box_size,) * 3, dtype=np.float32)
        for k in range(self.box_size):
            a, b = lo[k], hi[k]
            if b > a:
                np.matmul(py_t[:, a:b] * pz[k, a:b], px[a:b], out=volume[k])
        return volume

    # -- sampling --------------------------------------------------------------------------
    def sample(self, n: int, labels: np.ndarray | None = None) -> ParticleBatch:
        """``n`` random particles; ``labels`` (n,) fixes which structure each one shows."""
        if labels is None:
            labels = self.rng.integers(0, len(self.structures), size=n)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries, expected {n}")
        if n and (labels.min() < 0 or labels.max() >= len(self.structures)):
            raise ValueError(f"labels must lie in [0, {len(self.structures)})")
        rotations = random_rotations(n, self.rng, self.max_angle).astype(np.float32)
        shifts = self.rng.uniform(-self.max_shift, self.max_shift, size=(n, 3)).astype(np.float32)

        box = self.box_size
        sign = np.float32(-1.0 if self.contrast == "dark" else 1.0)
        clean = np.empty((n, box, box, box), dtype=np.float32)
        for i in range(n):
            clean[i] = self.render(int(labels[i]), rotations[i], shifts[i])
            clean[i] *= sign
        particles = np.empty_like(clean)
        for start in range(0, n, FFT_CHUNK):
            stop = min(start + FFT_CHUNK, n)
            particles[start:stop] = self._image(clean[start:stop])
        _zscore(particles)
        _zscore(clean)
        return ParticleBatch(particles=particles, clean=clean, rotations=rotations, shifts=shifts,
                             labels=labels, names=list(self.names))

    def _image(self, signal: np.ndarray) -> np.ndarray:
        """(B, box, box, box) signed densities -> wedge/band-passed signal plus scaled noise."""
        box = self.box_size
        axes = (1, 2, 3)
        signal_filter = self._signal_filter
        noise = None
        if self.snr is not None:
            noise = self.rng.standard_normal(signal.shape, dtype=np.float32)
        if signal_filter is None:
            # Nothing to do in Fourier space: white noise, real-space variances.
            out = signal.copy()
            if noise is not None:
                scale = np.sqrt(signal.var(axis=axes, dtype=np.float64)
                                / (self.snr * noise.var(axis=axes, dtype=np.float64)))
                out += noise * scale.astype(np.float32)[:, None, None, None]
            return out
        spectrum = scipy.fft.rfftn(signal, axes=axes)
        if signal_filter is not None:
            spectrum *= signal_filter
        if noise is not None:
            noise_spectrum = scipy.fft.rfftn(noise, axes=axes)
            if self._wedge is not None:
                noise_spectrum *= self._wedge
            var_signal = _spectral_variance(spectrum, box)
            var_noise = _spectral_variance(noise_spectrum, box)
            scale = np.sqrt(var_signal / (self.snr * var_noise)).astype(np.float32)
            spectrum += noise_spectrum * scale[:, None, None, None]
        volumes = scipy.fft.irfftn(spectrum, s=(box, box, box), axes=axes)
        return volumes.astype(np.float32, copy=False)


def _combine(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Product of two optional masks."""
    if a is None:
        return b
    if b is None:
        return a
    return a * b
