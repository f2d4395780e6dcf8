"""The engine: shapes, chunking, input checks, and splats that re-render to the decoder's volume."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_helpers import spread_model

from cryolens.engine import Engine, resolve_device, zscore
from cryolens.errors import DeviceError, InputError
from cryolens.model import CryoLensConfig, CryoLensVAE

SMALL = CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=40, n_free=10)


@pytest.fixture(scope="module")
def engine():
    return Engine(spread_model(), device="cpu")


@pytest.fixture(scope="module")
def volumes():
    return np.random.default_rng(0).standard_normal((5, 48, 48, 48)).astype(np.float32)


def test_every_output_has_a_leading_n(engine, volumes):
    f = engine.features(volumes)
    assert f.embedding.shape == (5, 8) and f.log_variance.shape == (5, 8)
    assert f.pose_axis_angle.shape == (5, 4) and f.pose.shape == (5, 4)
    assert f.global_weight.shape == (5,)
    assert np.allclose(np.linalg.norm(f.pose, axis=1), 1, atol=1e-5)
    r = engine.reconstruct(volumes, segments=True)
    assert r.reconstruction.shape == (5, 48, 48, 48)
    assert r.affinity_reconstruction.shape == r.free_reconstruction.shape == (5, 48, 48, 48)
    s = engine.splats(volumes)
    assert s.centers.shape == (5, 50, 3) and s.scales.shape == s.weights.shape == (5, 50)
    assert engine.splats(volumes, include_free=False).centers.shape == (5, 40, 3)
    assert engine.features(volumes[0]).embedding.shape == (1, 8)


def test_chunking_by_memory_budget_changes_nothing(engine, volumes):
    """A budget too small for two particles: the model sees one at a time (its encoder's
    inputs, seen by a forward hook), and the numbers are those of one pass over all five."""
    whole = engine.reconstruct(volumes, use_predicted_pose=True)
    small = Engine(engine.model, device="cpu", memory_budget=1)
    seen: list[int] = []
    hook = engine.model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(len(args[0])))
    try:
        chunked = small.reconstruct(volumes, use_predicted_pose=True)
    finally:
        hook.remove()
    assert seen == [1] * 5
    assert np.allclose(whole.reconstruction, chunked.reconstruction, atol=1e-5)
    assert np.allclose(whole.features.embedding, chunked.features.embedding, atol=1e-5)


def test_options_change_the_output(engine, volumes):
    base = engine.reconstruct(volumes[:2])
    raw_render = engine.reconstruct(volumes[:2], final_convolution=False).reconstruction
    assert not np.allclose(base.reconstruction, raw_render)
    posed = engine.reconstruct(volumes[:2], use_predicted_pose=True).reconstruction
    assert not np.allclose(base.reconstruction, posed)
    raw = engine.reconstruct(volumes[:2], denormalise=False).reconstruction
    norm = engine.normalise(volumes[:2])
    std, mean = norm.std[:, None, None, None], norm.mean[:, None, None, None]
    assert np.allclose(base.reconstruction, raw * std + mean, atol=1e-5)


def test_splats_rerender_to_the_raw_render(engine, volumes):
    """Our splat definition is the renderer's: a plain Gaussian sum in voxel units reproduces it."""
    s = engine.splats(volumes[:2])
    raw = engine.reconstruct(volumes[:2], use_predicted_pose=True, final_convolution=False,
                             denormalise=False).reconstruction
    idx = np.arange(48, dtype=np.float64)
    for n in range(2):
        c, sig, w = s.centers[n].astype(np.float64), s.scales[n].astype(np.float64), s.weights[n]
        gz, gy, gx = (np.exp(-(idx[None, :] - c[:, k, None]) ** 2 / (2 * sig[:, None] ** 2))
                      for k in range(3))
        volume = np.einsum("j,jd,jh,jw->dhw", w, gz, gy, gx).clip(0, 1)
        assert np.abs(volume - raw[n]).max() < 1e-5
        assert volume.max() > 0.05  # the check is not vacuous


def test_normalisation_is_per_particle(engine, volumes):
    scaled = volumes.copy()
    scaled[1] = scaled[1] * 1000 + 5
    a, b = engine.features(volumes), engine.features(scaled)
    assert np.allclose(a.embedding, b.embedding, atol=1e-4)


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((2, 32, 32, 32), np.float32), "shape (N, 48, 48, 48)"),
    (np.zeros((48, 48), np.float32), "shape"),
    (np.zeros((0, 48, 48, 48), np.float32), "at least one"),
    (np.full((1, 48, 48, 48), np.nan, np.float32), "finite"),
    (np.full((1, 48, 48, 48), 1e39), "finite"),
    (np.full((1, 48, 48, 48), "a"), "real numbers"),
    ([np.zeros((48, 48, 48)), np.zeros((48, 48, 47))], "regular"),
    # the shape the caller passed, not the batch made of it
    (np.zeros((2, 48, 48), np.float32), "or (48, 48, 48) for one volume, got shape (2, 48, 48)"),
    (torch.zeros(2, 48, 48), "got shape (2, 48, 48)"),
    ("particles/particle_000.mrc", "got a str"),
    (None, "got a NoneType"),
])
def test_bad_input_is_an_input_error(engine, bad, fragment):
    with pytest.raises(InputError, match=None) as info:
        engine.features(bad)
    assert fragment in str(info.value)


@pytest.mark.parametrize("call, name", [
    (lambda e, v: e.reconstruct(v, segments="false"), "segments"),  # truthy: would mean yes
    (lambda e, v: e.reconstruct(v, use_predicted_pose="no"), "use_predicted_pose"),
    (lambda e, v: e.reconstruct(v, final_convolution=None), "final_convolution"),
    (lambda e, v: e.reconstruct(v, denormalise=0), "denormalise"),
    (lambda e, v: e.splats(v, include_free="false"), "include_free"),
    (lambda e, v: Engine(e.model, device="cpu", memory_budget=0), "memory_budget"),
    (lambda e, v: Engine(e.model, device="cpu", memory_budget=-1), "memory_budget"),
    (lambda e, v: Engine(e.model, device="cpu", memory_budget="1GB"), "memory_budget"),
    (lambda e, v: Engine(e.model, device="cpu", max_chunk=0), "max_chunk"),
    (lambda e, v: Engine(e.model, device="cpu", exact_zscore="false"), "exact_zscore"),
])
def test_options_of_the_wrong_type_or_value_are_input_errors_naming_them(engine, volumes, call,
                                                                        name):
    with pytest.raises(InputError, match=rf"^{name} must be ") as info:
        call(engine, volumes[:1])
    assert info.value.field == name


def test_numpy_scalars_and_float_budgets_are_accepted(engine, volumes):
    other = Engine(engine.model, device="cpu", memory_budget=2e9, max_chunk=np.int64(2),
                   exact_zscore=np.bool_(True))
    assert (other.memory_budget, other.max_chunk) == (2_000_000_000, 2)
    rec = other.reconstruct(volumes[:1], segments=np.bool_(True))
    assert rec.affinity_reconstruction is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA"):
        Engine(CryoLensVAE(SMALL), device="cuda")
    assert Engine(CryoLensVAE(SMALL), device="auto").device.type == "cpu"


UNUSABLE = ["meta", "xla"] + ([] if torch.backends.mps.is_available() else ["mps"])


@pytest.mark.parametrize("device", UNUSABLE)
def test_a_device_the_engine_cannot_use_is_a_device_error(device):
    """Not torch's RuntimeError from model.to(), nor (meta) a model whose weights are gone."""
    model = CryoLensVAE(SMALL)
    with pytest.raises(DeviceError, match=rf"device '{device}' is not available"):
        Engine(model, device=device)
    assert model.mu.weight.device.type == "cpu"


def test_a_gpu_index_beyond_the_machines_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"'cuda:7' was requested but this machine has 2 CUDA "
                                          r"GPU\(s\): use cuda:0 \.\. cuda:1"):
        resolve_device("cuda:7")


def _extreme_volumes() -> dict[str, np.ndarray]:
    base = np.random.default_rng(2).standard_normal((48, 48, 48)).astype(np.float32)
    one = base.copy()
    one[3, 4, 5] = 1e20
    top = np.finfo(np.float32).max
    return {
        "one voxel of 1e20": one,
        "1e17 with variation": (1e17 * (1 + 0.1 * base)).astype(np.float32),
        "all 3e38": np.full((48, 48, 48), 3e38, np.float32),
        "all -3e38": np.full((48, 48, 48), -3e38, np.float32),
        "3e38 and -3e38": np.where(base > 0, 3e38, -3e38).astype(np.float32),
        "float32 max and -max": np.where(base > 0, top, -top).astype(np.float32),
        "1e30 with variation": (1e30 * base).astype(np.float32),
        "tiny 1e-38": (1e-38 * base).astype(np.float32),
        "denormal 1e-45": np.where(base > 0, 1e-45, 0).astype(np.float32),
        "constant 3.7": np.full((48, 48, 48), 3.7, np.float32),
        "zeros": np.zeros((48, 48, 48), np.float32),
    }


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "device-zscore"])
@pytest.mark.parametrize("name", list(_extreme_volumes()))
def test_extreme_finite_values_give_finite_outputs(engine, name, exact):
    """Issue #9: numbers or an InputError, never NaN or infinity (here: always numbers)."""
    engine = Engine(engine.model, device="cpu", exact_zscore=exact)
    volume = _extreme_volumes()[name][None]
    results = [engine.features(volume), engine.reconstruct(volume, segments=True),
               engine.reconstruct(volume, final_convolution=False, denormalise=False),
               engine.splats(volume), engine.normalise(volume)]
    for result in results:
        for field, value in vars(result).items():
            if isinstance(value, np.ndarray):
                assert np.isfinite(value).all(), (name, type(result).__name__, field)
    if name in ("one voxel of 1e20", "1e17 with variation"):
        # Not the old all-zero input (float32 variance overflowed to an infinite std): the
        # true z-score, up to float32 rounding of its largest value (~330 for the 1e20 voxel).
        wide = volume[0].astype(np.float64)
        truth = (wide - wide.mean()) / wide.std()
        assert np.abs(results[-1].volumes[0] - truth).max() < 1e-6 * np.abs(truth).max()


def test_ordinary_particles_keep_the_float32_zscore(volumes):
    """The float64 rescue only touches particles whose float32 statistics overflow."""
    mixed = np.concatenate([volumes[:2], _extreme_volumes()["one voxel of 1e20"][None]])
    norm = zscore(mixed)
    for i in range(2):
        assert norm.mean[i] == volumes[i].mean() and norm.std[i] == volumes[i].std()
        expected = (volumes[i] - volumes[i].mean()) / (volumes[i].std() + np.float32(1e-6))
        assert np.array_equal(norm.volumes[i], expected)
    assert np.isfinite(norm.std[2]) and norm.volumes[2].std() > 0.99


def test_denormalising_beyond_float32_is_an_input_error(engine):
    """A reconstruction of ~10 (normalised units) times a std of ~3.4e38 cannot be a float32:
    an InputError that says so, and the same particle in normalised units is fine."""
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        model.decoder._decoder[2].bias.fill_(10.0)
    loud = Engine(model, device="cpu")
    volume = _extreme_volumes()["float32 max and -max"][None]
    with pytest.raises(InputError,
                       match=r"reconstruction of particle\(s\) \[0\] is not finite.*denormalise"):
        loud.reconstruct(volume)
    assert np.isfinite(loud.reconstruct(volume, denormalise=False).reconstruction).all()


def test_a_non_finite_output_is_an_input_error_not_a_nan(engine, volumes):
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        model.log_var.bias[0] = float("inf")
    with pytest.raises(InputError, match=r"log_variance of particle\(s\) \[0, 1\] is not finite"):
        Engine(model, device="cpu").features(volumes[:2])
