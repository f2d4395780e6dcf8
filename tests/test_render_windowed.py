"""The separable render's factors carry no subnormal floats, and the CPU render that skips a
splat's zeros matches the dense separable render to float32 rounding."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cryolens.model.render import PROFILE_FLOOR, profiles, render_dense, render_separable

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 2^-126


def _nonzero_min(t: torch.Tensor) -> float:
    nonzero = t[t != 0]
    return float(nonzero.min()) if nonzero.numel() else float("inf")


def test_render_factors_have_no_subnormal_values():
    """Profiles, the (d, h) planes and every product term are 0 or normal floats, whatever the
    weight (down to subnormal weights) and however far a splat lies from a grid point."""
    gen = torch.Generator().manual_seed(0)
    batch, n_splats, n = 3, 200, 40
    centres = (torch.rand(batch, 3, n_splats, generator=gen) * 4 - 2)
    sigmas = torch.rand(batch, n_splats, generator=gen) * 0.2 + 1e-3
    weights = 10.0 ** -(torch.rand(batch, n_splats, generator=gen) * 45)  # 1 .. 1e-45
    axis = torch.linspace(-1, 1, n)
    gz, gy, gx = profiles(centres, weights, sigmas, axis)
    assert (weights < TINY).any() and (weights > 0).any()  # the test's range covers both
    planes = gz[:, :, :, None] * gy[:, :, None, :]
    for name, t in [("gz", gz), ("gy", gy), ("gx", gx), ("planes", planes)]:
        assert _nonzero_min(t) >= TINY, f"{name} has a subnormal value"
        assert t.max() <= 1.0
    for name, t in [("gz", gz), ("gy", gy), ("gx", gx)]:
        assert _nonzero_min(t) >= PROFILE_FLOOR, name
        assert (t == 0).any(), f"{name}: splats far from the grid give exact zeros"
    # the smallest term the matrix product can form is still a normal float
    assert _nonzero_min(planes) * _nonzero_min(gx) >= TINY


def _dense_float64(gz, gy, gx):
    """The same factors summed densely in float64: every term, no rounding to speak of."""
    return torch.einsum("bjd,bjh,bjw->bdhw", gz.double(), gy.double(), gx.double())


@st.composite
def splat_sets(draw):
    batch = draw(st.integers(1, 3))
    n_splats = draw(st.integers(1, 60))
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([0.3, 1.0, 3.0]))  # 3: many splats outside the box
    centres = (torch.rand(batch, 3, n_splats, generator=gen) * 2 - 1) * spread
    # tiny (under a grid step), ordinary, and large enough to cover the whole box
    scale = draw(st.sampled_from([1e-3, 0.03, 0.1, 2.0]))
    sigmas = (torch.rand(batch, n_splats, generator=gen) + 0.05) * scale
    weights = torch.rand(batch, n_splats, generator=gen)
    if draw(st.booleans()):
        weights = weights * (torch.rand(batch, n_splats, generator=gen) < 0.3)  # some exactly 0
    return centres, weights, sigmas, torch.linspace(-1, 1, n)


@settings(max_examples=60, deadline=None)
@given(splat_sets())
def test_windowed_cpu_render_is_the_dense_sum(case):
    """The CPU inference render (which skips zeros) equals the dense sum of the same factors to
    float32 rounding, and the plain dense renderer within the raw-render parity tolerance."""
    centres, weights, sigmas, axis = case
    n = axis.shape[0]
    with torch.inference_mode():
        ours = render_separable(centres, weights, sigmas, axis).double()
        exact = _dense_float64(*profiles(centres, weights, sigmas, axis)).clamp(0, 1)
        oracle = render_dense(centres, weights, sigmas, axis).double()
    assert ours.shape == (len(centres), n, n, n)
    # float32 rounding of sums of positive terms: a few ulps of the value (a term left out
    # would show as a relative error of its share of the sum)
    assert torch.all((ours - exact).abs() <= 1e-6 * exact + 1e-30)
    assert (ours - oracle).abs().max() <= 2e-4


def test_windowed_render_on_the_v001_decoder_matches_the_training_path():
    """On the real architecture's splats (all 768, the conv region), inference's windowed render
    and the dense product training uses agree to float32 rounding."""
    from cryolens.model import CryoLensVAE

    torch.manual_seed(0)
    model = CryoLensVAE().eval()
    z = torch.randn(4, model.config.latent_dims)
    pose, weight = model.identity_pose(4)
    decoder = model.decoder
    with torch.no_grad():
        splats = decoder.splats(z, pose, weight)
    with torch.inference_mode():
        windowed = decoder.render(splats, "conv")
    with torch.enable_grad():  # the autograd path: one dense batched product
        dense = decoder.render(splats, "conv").detach()
    assert (windowed - dense).abs().max() <= 1e-6
    assert (windowed > 0).any() and (windowed == 0).any()
