"""Tests of the synthetic particle simulator and its packaged structures (cryolens.synth).

Checks geometry, pose, wedge, SNR, normalisation and reproducibility with numbers.
"""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryolens.synth import (
    ParticleBatch,
    ParticleSimulator,
    Structure,
    load_structures,
    quaternion_to_matrix,
    random_rotations,
)

BOX = 48


def _zscore(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return (v - v.mean()) / v.std()


def _missing_wedge(box: int, tilt_range: float) -> np.ndarray:
    """Boolean (box, box, box//2+1) rfftn mask of the components the wedge must remove."""
    kz = np.fft.fftfreq(box)[:, None, None]
    kx = np.fft.rfftfreq(box)[None, None, :]
    missing = np.abs(kz) > np.abs(kx) * np.tan(np.deg2rad(tilt_range))
    return np.broadcast_to(missing, (box, box, box // 2 + 1))


def _power(volumes: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.rfftn(volumes.astype(np.float64), axes=(1, 2, 3))) ** 2


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    return load_structures()


@pytest.fixture(scope="module")
def batch() -> ParticleBatch:
    return ParticleSimulator(seed=7).sample(12)


# -- structures -----------------------------------------------------------------------------
def test_structures_load_unique_and_match_provenance(structures: list[Structure]) -> None:
    assert len(structures) >= 10
    names = [s.name for s in structures]
    assert len(set(names)) == len(names)
    data = resources.files("cryolens.data")
    meta = json.loads((data / "structures.json").read_text())
    records = {r["name"]: r for r in meta["structures"]}
    assert list(records) == names
    with np.load(str(data / "structures.npz")) as npz:
        assert [str(n) for n in npz["names"]] == names
    for s in structures:
        rec = records[s.name]
        assert s.pdb_id == rec["pdb_id"] and len(s.pdb_id) == 4
        assert s.coords.dtype == np.float32 and s.coords.shape == (rec["n_points"], 3)
        assert s.weights.shape == (rec["n_points"],) and (s.weights > 0).all()
        assert rec["n_points"] <= 4000 and rec["n_points"] <= rec["n_residues"]
        assert rec["source_package"] and rec["source_path"] and "CC0" in rec["licence"]
        w = s.weights.astype(np.float64)
        c = s.coords.astype(np.float64)
        np.testing.assert_allclose((w[:, None] * c).sum(0) / w.sum(), 0.0, atol=1e-3)
        rg = np.sqrt((w * (c**2).sum(1)).sum() / w.sum())
        assert rg == pytest.approx(rec["radius_of_gyration_angstrom"], abs=0.02)
    # Sizes differ clearly: small proteins to ribosomes, all fitting the 480 Å box.
    rgs = [records[n]["radius_of_gyration_angstrom"] for n in names]
    assert min(rgs) < 25 and max(rgs) > 80
    assert max(r["max_extent_angstrom"] for r in records.values()) < BOX * 10.0 * 0.75


def test_load_structures_is_cached(structures: list[Structure]) -> None:
    again = load_structures()
    assert all(a is b for a, b in zip(structures, again, strict=True))
    assert not again[0].coords.flags.writeable


# -- batch contents -------------------------------------------------------------------------
def test_shapes_and_dtypes(batch: ParticleBatch, structures: list[Structure]) -> None:
    n = 12
    assert batch.particles.shape == (n, BOX, BOX, BOX) and batch.particles.dtype == np.float32
    assert batch.clean.shape == (n, BOX, BOX, BOX) and batch.clean.dtype == np.float32
    assert batch.rotations.shape == (n, 3, 3) and batch.rotations.dtype == np.float32
    assert batch.shifts.shape == (n, 3) and batch.shifts.dtype == np.float32
    assert batch.labels.shape == (n,) and batch.labels.dtype == np.int64
    assert batch.names == [s.name for s in structures]
    assert (np.abs(batch.shifts) <= 2.0).all()
    assert batch.labels.min() >= 0 and batch.labels.max() < len(structures)


def test_particles_and_clean_are_zscored(batch: ParticleBatch) -> None:
    for volumes in (batch.particles, batch.clean):
        np.testing.assert_allclose(volumes.mean(axis=(1, 2, 3), dtype=np.float64), 0.0, atol=1e-5)
        np.testing.assert_allclose(volumes.std(axis=(1, 2, 3), dtype=np.float64), 1.0, atol=1e-4)


@pytest.mark.slow  # simulates five batches
def test_same_seed_same_batches_other_seed_differs() -> None:
    a, b = ParticleSimulator(seed=11), ParticleSimulator(seed=11)
    for _ in range(2):  # the second call too: same call sequence, same stream
        x, y = a.sample(3), b.sample(3)
        for field in ("particles", "clean", "rotations", "shifts", "labels"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), field
    other = ParticleSimulator(seed=12).sample(3)
    assert not np.array_equal(other.rotations, ParticleSimulator(seed=11).sample(3).rotations)


def test_explicit_labels_are_used() -> None:
    labels = np.array([3, 0, 3, 1])
    b = ParticleSimulator(seed=0, snr=None).sample(4, labels=labels)
    assert b.labels.tolist() == [3, 0, 3, 1]
    with pytest.raises(ValueError):
        ParticleSimulator(seed=0).sample(2, labels=np.array([0, 99]))


# -- geometry and pose ----------------------------------------------------------------------
def test_axis_convention_and_shift() -> None:
    # One point at (x, y, z) = (65, -25, 5) Å lands on voxel (d, h, w) = (24, 21, 30).
    point = Structure("point", "NONE", np.array([[65.0, -25.0, 5.0]], np.float32),
                      np.ones(1, np.float32))
    sim = ParticleSimulator([point], snr=None, tilt_range=None)
    vol = sim.render(0, np.eye(3), np.zeros(3))
    assert np.unravel_index(vol.argmax(), vol.shape) == (24, 21, 30)
    assert vol.max() == pytest.approx(1.0, abs=1e-6)  # weight 1, exactly on a voxel centre
    # Gaussian of sigma = blur = 1 voxel: one voxel away along x drops by exp(-1/2).
    assert vol[24, 21, 31] == pytest.approx(np.exp(-0.5), rel=1e-5)
    shifted = sim.render(0, np.eye(3), np.array([1.0, 2.0, -3.0]))
    assert np.unravel_index(shifted.argmax(), shifted.shape) == (25, 23, 27)
    # A 90 degree rotation about z takes x to y: (65, -25, 5) -> (25, 65, 5) Å.
    rz = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float64)
    rotated = sim.render(0, rz, np.zeros(3))
    assert np.unravel_index(rotated.argmax(), rotated.shape) == (24, 30, 26)


def test_render_matches_dense_reference(structures: list[Structure]) -> None:
    sim = ParticleSimulator(structures, snr=None)
    rot = random_rotations(1, np.random.default_rng(0))[0]
    shift = np.array([0.3, -1.2, 1.7])
    idx = [s.name for s in structures].index("tcr_pmhc")
    s = structures[idx]
    p = s.coords.astype(np.float64) @ rot.T
    grid = np.arange(BOX)
    centre = (BOX - 1) / 2

    def profile(coord: np.ndarray, sh: float) -> np.ndarray:
        return np.exp(-0.5 * (grid[None, :] - (centre + coord / 10.0 + sh)[:, None]) ** 2)

    ref = np.einsum("m,mz,my,mx->zyx", s.weights.astype(np.float64), profile(p[:, 2], shift[0]),
                    profile(p[:, 1], shift[1]), profile(p[:, 0], shift[2]))
    vol = sim.render(idx, rot, shift)
    assert np.abs(vol - ref).max() < 1e-4 * ref.max()


def test_returned_rotation_reproduces_clean(structures: list[Structure]) -> None:
    # Elongated, asymmetric structures, so that a wrong pose is clearly wrong.
    names = [s.name for s in structures]
    labels = np.array([names.index(n) for n in ("ribosome_70s", "spliceosome", "dengue_e_fab",
                                                  "tcr_pmhc")])
    sim = ParticleSimulator(structures, seed=7)
    batch = sim.sample(len(labels), labels=labels)
    rng = np.random.default_rng(1)
    for i, label in enumerate(labels):
        vol = sim.render(int(label), batch.rotations[i], batch.shifts[i])
        expected = _zscore(-vol)  # "dark" contrast: protein negative
        assert np.abs(expected - batch.clean[i]).max() < 1e-3
        assert (expected * batch.clean[i]).mean() > 0.99999
        other = random_rotations(1, rng)[0]
        wrong = _zscore(-sim.render(int(label), other, batch.shifts[i]))
        assert np.abs(wrong - batch.clean[i]).max() > 0.5
        assert (wrong * batch.clean[i]).mean() < 0.9


def test_rotations_are_proper(batch: ParticleBatch) -> None:
    r = batch.rotations.astype(np.float64)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape),
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False, allow_subnormal=False), min_size=4, max_size=4)
       .filter(lambda q: np.linalg.norm(q) > 1e-3))
def test_quaternion_matrix_is_a_rotation(q: list[float]) -> None:
    q = np.asarray(q) / np.linalg.norm(q)
    r = quaternion_to_matrix(q[None])[0]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    # The axis (x, y, z part of q) is left where it is.
    np.testing.assert_allclose(r @ q[1:], q[1:], atol=1e-12)


def test_rotations_are_uniform() -> None:
    # For uniform rotations, E[R] = 0 and E[trace R] = 0 (trace ranges over [-1, 3]).
    r = random_rotations(20000, np.random.default_rng(0))
    assert np.abs(r.mean(0)).max() < 0.02
    assert abs(np.trace(r, axis1=1, axis2=2).mean()) < 0.03


def test_rotations_within_max_angle_follow_the_restricted_uniform_density() -> None:
    r = random_rotations(20000, np.random.default_rng(1), max_angle=60.0)
    angle = np.degrees(np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angle.max() <= 60.0 + 1e-6
    # Haar measure: density of the angle is proportional to (1 - cos t) on [0, 60]; its mean:
    t = np.radians(np.linspace(0, 60, 100001))
    expected = np.degrees((t * (1 - np.cos(t))).sum() / (1 - np.cos(t)).sum())
    assert abs(angle.mean() - expected) < 0.3
    assert np.abs(r.mean(0) - r.mean(0).T).max() < 0.02  # no preferred rotation sense
    with pytest.raises(ValueError, match="max_angle"):
        ParticleSimulator(max_angle=0.0)


# -- imaging model --------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_wedge_is_removed() -> None:
    tilt = 60.0
    b = ParticleSimulator(seed=3, tilt_range=tilt).sample(4)
    missing = _missing_wedge(BOX, tilt)
    for volumes, present in ((b.particles, False), (b.clean, True)):
        power = _power(volumes)
        inside = power[:, missing].sum(1)
        outside = power[:, ~missing].sum(1)
        if present:
            assert (inside / outside > 0.05).all()
        else:
            assert (inside / outside < 1e-9).all()
    # Without a wedge, the particles' noise fills that region again.
    free = ParticleSimulator(seed=3, tilt_range=None).sample(2)
    power = _power(free.particles)
    assert (power[:, missing].sum(1) / power[:, ~missing].sum(1) > 0.05).all()


@pytest.mark.parametrize("snr", [0.5, 5.0])
def test_snr_is_variance_ratio(snr: float) -> None:
    # Same seed, so the poses are shared; snr=None gives the z-scored noise-free signal s, and
    # the noisy particle is (s * sd_s + n) / sd_total: regressing on s recovers sd_s / sd_total.
    signal = ParticleSimulator(seed=5, snr=None).sample(8)
    noisy = ParticleSimulator(seed=5, snr=snr).sample(8)
    assert np.array_equal(signal.rotations, noisy.rotations)
    a = (signal.particles.astype(np.float64) * noisy.particles).mean(axis=(1, 2, 3))
    measured = a**2 / (1 - a**2)
    assert np.median(measured) == pytest.approx(snr, rel=0.05)
    assert np.all(np.abs(measured / snr - 1) < 0.15)


@pytest.mark.slow  # simulates two batches without noise
def test_contrast_sign() -> None:
    dark = ParticleSimulator(seed=2, snr=None, contrast="dark").sample(2)
    light = ParticleSimulator(seed=2, snr=None, contrast="light").sample(2)
    np.testing.assert_allclose(dark.clean, -light.clean, atol=1e-5)
    np.testing.assert_allclose(dark.particles, -light.particles, atol=1e-4)
    # The box centre (inside every structure) is darker than the mean in "dark" contrast.
    centre = dark.clean[:, 22:26, 22:26, 22:26].mean(axis=(1, 2, 3))
    assert (centre < 0).all()


def test_bandpass_removes_frequencies_outside_band() -> None:
    low, high = 0.005, 0.02  # 1/Å; Nyquist is 0.05 at 10 Å per voxel
    b = ParticleSimulator(seed=4, snr=None, tilt_range=None, bandpass=(low, high)).sample(3)
    kz = np.fft.fftfreq(BOX)[:, None, None]
    ky = np.fft.fftfreq(BOX)[None, :, None]
    kx = np.fft.rfftfreq(BOX)[None, None, :]
    k = np.sqrt(kz**2 + ky**2 + kx**2) / 10.0
    edge = 1.0 / (BOX * 10.0)
    power = _power(b.particles)
    outside = (k > high + edge / 2) | (k < low - edge / 2)
    assert (power[:, outside].sum(1) / power.sum(axis=(1, 2, 3)) < 1e-9).all()


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError):
        ParticleSimulator(contrast="grey")
    with pytest.raises(ValueError):
        ParticleSimulator(snr=0.0)
    with pytest.raises(ValueError):
        ParticleSimulator(bandpass=(0.02, 0.01))
    with pytest.raises(ValueError):
        ParticleSimulator(tilt_range=120.0)
