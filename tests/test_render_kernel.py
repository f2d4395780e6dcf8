"""The fused Triton render (cryolens.model.render_kernel) against the other renders: compiled on
a CUDA GPU, and in Triton's CPU interpreter where Triton is installed (it comes with CUDA
builds of PyTorch, not with the CPU wheel CI installs)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from parity_helpers import REPO

from cryolens.model import render

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu_check.sh runs these there)")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (CUDA builds of PyTorch bring it; the CPU wheel does not)")

#: (particles, splats, voxels an axis): the whole decoder, each segment, the crop region, the
#: kernel's largest axis, and sizes that fill no tile.
SHAPES = [(3, 768, 56), (2, 614, 48), (2, 154, 56), (1, 40, 64), (2, 37, 5)]


def _splats(batch: int, n_splats: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(batch, 3, n_splats, generator=g) * 2 - 1) * 1.2
    weights = torch.rand(batch, n_splats, generator=g)
    sigmas = torch.rand(batch, n_splats, generator=g) * 0.1 + 0.02
    return centres.to(device), weights.to(device), sigmas.to(device)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_fused_render_matches_the_cublas_render_on_cuda(precision, monkeypatch):
    for batch, n_splats, n in SHAPES:
        centres, weights, sigmas = _splats(batch, n_splats, "cuda")
        axis = torch.linspace(-1, 1, n, device="cuda")
        with torch.inference_mode():
            monkeypatch.setattr(render, "GPU_RENDER", precision)
            fused = render.render_separable(centres, weights, sigmas, axis)
            monkeypatch.setattr(render, "GPU_RENDER", "cublas")
            cublas = render.render_separable(centres, weights, sigmas, axis)
        assert fused.shape == cublas.shape == (batch, n, n, n)
        assert (fused - cublas).abs().max().item() < 2e-6, (precision, batch, n_splats, n)
    assert not render._KERNEL_FAILED


@needs_cuda
@needs_triton
def test_fused_render_keeps_nan_and_is_what_inference_uses(monkeypatch):
    monkeypatch.setattr(render, "GPU_RENDER", "auto")
    assert render.fused_precision(torch.device("cuda")) in ("tf32x3", "ieee")
    assert render.fused_precision(torch.device("cpu")) is None
    centres, weights, sigmas = _splats(2, 768, "cuda")
    centres[1, 0, 5] = float("nan")
    with torch.inference_mode():
        out = render.render_separable(centres, weights, sigmas, torch.linspace(-1, 1, 56).cuda())
    assert not out[0].isnan().any() and out[1].isnan().any()  # clamp keeps NaN, as torch's does


@needs_triton
@pytest.mark.slow
def test_fused_kernel_in_tritons_interpreter_matches_the_separable_render():
    """The kernel's indexing and masks, run by Triton's interpreter on the CPU."""
    script = textwrap.dedent("""
        import torch
        from cryolens.model import render, render_kernel
        from test_render_kernel import SHAPES, _splats
        worst = 0.0
        for batch, n_splats, n in SHAPES:
            centres, weights, sigmas = _splats(batch, n_splats)
            axis = torch.linspace(-1, 1, n)
            ref = render.render_separable(centres, weights, sigmas, axis)
            inv = 1.0 / (2.0 * sigmas * sigmas)
            def across(k):  # (B, n, N)
                diff = axis.view(1, n, 1) - centres[:, k, None, :]
                return torch.exp(-(diff * diff) * inv[:, None, :])
            gx = (across(0) * weights[:, None, :]).transpose(1, 2).contiguous()
            got = render_kernel.render(across(2), across(1), gx, "ieee")
            worst = max(worst, (got.reshape(ref.shape) - ref).abs().max().item())
        centres, weights, sigmas = _splats(1, 37)
        centres[0, 2, 3] = float("nan")
        axis = torch.linspace(-1, 1, 5)
        inv = 1.0 / (2.0 * sigmas * sigmas)
        def across(k):
            diff = axis.view(1, 5, 1) - centres[:, k, None, :]
            return torch.exp(-(diff * diff) * inv[:, None, :])
        gx = (across(0) * weights[:, None, :]).transpose(1, 2).contiguous()
        nan = render_kernel.render(across(2), across(1), gx, "ieee").isnan().any().item()
        print(worst, nan)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "client" / "src"), str(REPO / "src"),
                                          str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst, nan = done.stdout.split()
    assert float(worst) < 1e-6 and nan == "True"
