"""The network's pieces: rotations, the fast renderer against the dense oracle, the final conv."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.model.decoder import _fft_valid_correlation
from cryolens.model.render import render_dense, render_separable
from cryolens.model.rotation import axis_angle_to_quaternion, pose_to_matrix

# The engine flushes denormals (a process-wide CPU flag), so no subnormal examples.
finite = st.floats(-4, 4, allow_nan=False, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(angle=st.floats(-6.28, 6.28, allow_subnormal=False),
       axis=st.tuples(finite, finite, finite).filter(lambda a: np.linalg.norm(a) > 0.05))
def test_rotation_is_orthonormal_and_about_the_axis(angle, axis):
    # (the 1e-8 on the axis norm makes tiny axes non-unit, as in CryoLens: tested in parity)
    pose = torch.tensor([[angle, *axis]], dtype=torch.float64)
    q = axis_angle_to_quaternion(pose)
    assert torch.allclose(q.norm(dim=1), torch.ones(1, dtype=torch.float64), atol=1e-6)
    r = pose_to_matrix(pose)[0]
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.det(r).item() == pytest.approx(1.0, abs=1e-5)
    a = torch.tensor(axis, dtype=torch.float64)
    assert torch.allclose(r @ a, a, atol=1e-5 * (1 + a.norm().item()))


def test_quarter_turn_about_z_is_counter_clockwise():
    r = pose_to_matrix(torch.tensor([[math.pi / 2, 0.0, 0.0, 1.0]]))[0]
    x_axis, y_axis = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(r @ x_axis, y_axis, atol=1e-6)


def test_identity_convention_gives_identity_matrix_with_non_unit_quaternion():
    q = axis_angle_to_quaternion(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert q[0, 0].item() == pytest.approx(math.cos(0.5))
    assert torch.equal(pose_to_matrix(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0], torch.eye(3))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40),
       sigma_lo=st.sampled_from([0.005, 0.02, 0.1]), weight_scale=st.sampled_from([0.05, 0.5, 1.0]))
def test_separable_renderer_equals_dense_oracle(seed, n, sigma_lo, weight_scale):
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, 74)[20:44]  # any sub-grid: 24 points along every axis
    centres = (torch.rand(2, 3, n, generator=g) * 2 - 1) * 0.6
    weights = torch.rand(2, n, generator=g) * weight_scale
    # sigmas at both ends of CryoLens's range, 0.005 .. 0.1 grid units
    sigmas = torch.where(torch.rand(2, n, generator=g) < 0.5, torch.full((2, n), sigma_lo),
                         torch.full((2, n), 0.1))
    fast = render_separable(centres, weights, sigmas, axis)
    dense = render_dense(centres.double(), weights.double(), sigmas.double(), axis.double())
    assert fast.shape == (2, 24, 24, 24)
    assert torch.allclose(fast.double(), dense, atol=2e-6)


def test_separable_renderer_batched_and_per_particle_paths_agree():
    g = torch.Generator().manual_seed(3)
    centres, weights = torch.rand(3, 3, 50, generator=g) - 0.5, torch.rand(3, 50, generator=g)
    sigmas = torch.rand(3, 50, generator=g) * 0.09 + 0.01
    axis = torch.linspace(-1, 1, 30)
    with torch.inference_mode():
        looped = render_separable(centres, weights, sigmas, axis)
    with torch.enable_grad():
        batched = render_separable(centres.requires_grad_(), weights, sigmas, axis)
    assert torch.allclose(looped, batched.detach(), atol=1e-6)
    batched.sum().backward()
    assert centres.grad is not None and torch.isfinite(centres.grad).all()


def test_fft_correlation_equals_conv3d():
    g = torch.Generator().manual_seed(1)
    volume, kernel = torch.rand(2, 20, 20, 20, generator=g), torch.randn(5, 5, 5, generator=g)
    direct = torch.nn.functional.conv3d(volume[:, None], kernel[None, None])[:, 0]
    assert torch.allclose(_fft_valid_correlation(volume, kernel), direct, atol=1e-4)


@pytest.mark.parametrize("config", [
    CryoLensConfig(),
    CryoLensConfig(box_size=32, latent_dims=10, affinity_dims=7, n_affinity=50, n_free=11),
    CryoLensConfig(latent_dims=8, affinity_dims=8, n_affinity=20, n_free=0),
])
def test_any_configuration_decodes_to_its_box(config):
    model = CryoLensVAE(config).eval()
    x = torch.randn(2, config.box_size, config.box_size, config.box_size)
    with torch.inference_mode():
        enc = model.encode(x)
        assert enc.mu.shape == (2, config.latent_dims) and enc.pose.shape == (2, 4)
        for final in (True, False):
            out = model.decoder(enc.mu, enc.pose, enc.global_weight, final_convolution=final)
            assert out.shape == (2,) + (config.box_size,) * 3
        fft = model.decoder.final_convolution(model.decoder.render(
            model.decoder.splats(enc.mu, enc.pose, enc.global_weight), "conv"), "fft")
        direct = model.decoder.final_convolution(model.decoder.render(
            model.decoder.splats(enc.mu, enc.pose, enc.global_weight), "conv"), "direct")
    assert torch.allclose(fft, direct, atol=1e-5 * (1 + direct.abs().max().item()))


def test_crop_region_is_centre_of_full_render():
    model = CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=30, n_free=6))
    with torch.inference_mode():
        s = model.decoder.splats(torch.randn(1, 8), *model.identity_pose(1))
        full = model.decoder.render(s, "full")
        crop = model.decoder.render(s, "crop")
    assert torch.allclose(full[:, 13:61, 13:61, 13:61], crop, atol=1e-6)


def test_renderer_backward_matches_autograd():
    from cryolens.model.render import _OuterSum

    g = torch.Generator().manual_seed(5)
    factors = [torch.rand(2, 5, 4, dtype=torch.float64, generator=g).requires_grad_()
               for _ in range(3)]
    assert torch.autograd.gradcheck(_OuterSum.apply, factors)
