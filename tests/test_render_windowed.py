"""The separable render's factors carry no subnormal floats, and the CPU render that skips a
splat's zeros matches the dense separable render to float32 rounding."""
from __future__ import annotations

import torch

from cryolens.model.render import PROFILE_FLOOR, profiles

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
