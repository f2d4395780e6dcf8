"""The separable splat render as one Triton kernel: no (N, n*n) planes in GPU memory.

``render_separable`` on a GPU forms each particle's planes ``gz[j, d] * gy[j, h]`` (768 x 3,136
floats, 9.6 MB a particle) and multiplies them by ``gx`` with cuBLAS: writing and reading the
planes costs as much as the product. Here each program builds a tile of the planes in registers
and feeds it straight to ``tl.dot``, and clamps to [0, 1] on the way out.

This module imports Triton; :mod:`cryolens.model.render` imports it only on a CUDA device, and
falls back to the cuBLAS path where Triton is missing or the kernel cannot be built.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: Tile sizes: rows of the (d, h) plane, columns along w (n <= 64 in one tile), splats per step.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 64, 32
NUM_WARPS, NUM_STAGES = 8, 3
#: The longest axis one tile covers.
MAX_AXIS = BLOCK_N


@triton.jit
def _render(gz_t, gy_t, gx_w, out, n_splats: tl.constexpr, n: tl.constexpr,
            plane: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr):
    """out[b, d*n + h, w] = clamp(sum_j gz_t[b, d, j] gy_t[b, h, j] gx_w[b, j, w], 0, 1)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < plane
    col_ok = cols < n
    d = rows // n
    h = rows % n
    z_rows = gz_t + b * n * n_splats + d[:, None] * n_splats
    y_rows = gy_t + b * n * n_splats + h[:, None] * n_splats
    x_base = gx_w + b * n_splats * n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_splats, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < n_splats
        mask = row_ok[:, None] & k_ok[None, :]
        planes = (tl.load(z_rows + ks[None, :], mask=mask, other=0.0)
                  * tl.load(y_rows + ks[None, :], mask=mask, other=0.0))
        profile = tl.load(x_base + ks[:, None] * n + cols[None, :],
                          mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(planes, profile, acc, input_precision=PRECISION)
    # Clamp as torch.clamp does: NaN stays NaN (tl.minimum/maximum would drop it).
    acc = tl.where(acc < 0.0, 0.0, tl.where(acc > 1.0, 1.0, acc))
    tl.store(out + b * plane * n + rows[:, None] * n + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


def render(gz_t: torch.Tensor, gy_t: torch.Tensor, gx_w: torch.Tensor,
           precision: str) -> torch.Tensor:
    """gz_t, gy_t: (B, n, N) profiles along d and h; gx_w: (B, N, n) weighted profiles along w;
    all contiguous float32 on one CUDA device. Returns the clamped (B, n*n, n) volume."""
    batch, n, n_splats = gz_t.shape
    if n > MAX_AXIS:
        raise ValueError(f"the fused render takes up to {MAX_AXIS} voxels an axis, got {n}")
    out = torch.empty((batch, n * n, n), dtype=torch.float32, device=gz_t.device)
    grid = (batch, triton.cdiv(n * n, BLOCK_M))
    # (CPU tensors only under TRITON_INTERPRET=1, Triton's interpreter, for tests)
    with torch.cuda.device(gz_t.device) if gz_t.is_cuda else contextlib.nullcontext():
        _render[grid](gz_t, gy_t, gx_w, out, n_splats, n, n * n,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=precision,
                      num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
