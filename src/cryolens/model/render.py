"""Gaussian splat renderers: a fast separable one for inference and training, a dense one as oracle.

An isotropic Gaussian factorises over the axes, so a volume of N splats is
``V[d, h, w] = sum_j w_j gz_j[d] gy_j[h] gx_j[w]``: one (d*h, N) x (N, w) matrix product per
particle instead of CryoLens's dense (voxels x splats) distance tensor. Profiles are floored
to exact zeros (:data:`PROFILE_FLOOR`); inference on a CPU then skips them, slab by slab along
d (:func:`_render_windowed`). Both renderers follow spec.md c.6: coordinate component x runs
along the last array axis, z along the first.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import warnings

import torch

#: CryoLens floors the Gaussian exponent here; exp(-88) is below float32's normal range.
EXPONENT_FLOOR = -88.0
#: The separable renderers set each splat's profile (and its weighted x profile) to exactly 0
#: where it is not above this: what float32 can still add to a sum of order 1 (2^-24 is half
#: an ulp of 1; a dropped term is below 2^-24 times its weight, every factor being <= 1), and
#: no factor of the matrix product is subnormal: a term is a product of three factors, each 0
#: or > 2^-24, hence 0 or > 2^-72, inside float32's normal range (>= 2^-126). Subnormal
#: operands cost ~100x on x86 CPUs (microcode assists) unless the thread flushes them, and
#: flushing is per-thread state that torch's worker threads do not share. From 2^-40 to 2^-24
#: a splat's window shrinks from 7.4 to 5.8 sigma: v001's reconstruction 4.8 -> 4.0 ms a
#: particle on one thread, its outputs moved by at most 4e-7 (range 0.6), the parity
#: tolerances unchanged (docs/benchmarks.md).
PROFILE_FLOOR = 2.0**-24
_LOG_PROFILE_FLOOR = math.log(PROFILE_FLOOR)

#: How inference renders on a GPU: "auto" (the fused Triton kernel of
#: :mod:`cryolens.model.render_kernel`, its products in three-pass TF32 on Ampere and later,
#: which keeps float32 accuracy; plain float32 before), "tf32x3" or "ieee" (that kernel, in
#: that precision), or "cublas" (planes in GPU memory, then one batched matrix product).
GPU_RENDER = "auto"
_KERNEL_FAILED: dict[str, str] = {}  # device -> why the fused kernel could not run there


def render_separable(
    centres: torch.Tensor,
    weights: torch.Tensor,
    sigmas: torch.Tensor,
    axis: torch.Tensor,
) -> torch.Tensor:
    """Render splats on the cube ``axis x axis x axis`` and clamp the sum to [0, 1].

    centres: (B, 3, N) rows (x, y, z) in grid units; weights, sigmas: (B, N), sigmas in grid
    units; axis: (n,) coordinates of the grid points along every axis. Returns (B, n, n, n)
    indexed [d, h, w].
    """
    batch = centres.shape[0]
    n = axis.shape[0]
    inv_two_var = 1.0 / (2.0 * sigmas * sigmas)  # (B, N)
    gx = weighted_profile(centres, inv_two_var, axis, weights)
    precision = None if torch.is_grad_enabled() else fused_precision(centres.device)
    if precision is not None:
        volume = _render_fused(centres, gx, inv_two_var, axis, precision)
        if volume is not None:
            return volume.reshape(batch, n, n, n)
    gy, gz = _profile(centres, inv_two_var, axis, 1), _profile(centres, inv_two_var, axis, 2)
    if torch.is_grad_enabled():
        volume = _OuterSum.apply(gz, gy, gx)
    elif centres.device.type != "cpu":
        volume = torch.bmm(_planes(gz, gy).transpose(1, 2), gx)
    else:
        # a buffer of its own (in place: no copy of the volume)
        return _render_windowed(gz, gy, gx).clamp_(0.0, 1.0)
    return volume.reshape(batch, n, n, n).clamp(0.0, 1.0)


def _profile(centres, inv_two_var, axis, k: int, *, splats_last: bool = False) -> torch.Tensor:
    """Each splat's Gaussian along coordinate ``k`` (0: x, 1: y, 2: z) at the grid points
    ``axis``: (B, N, n), or (B, n, N) with ``splats_last`` (the fused kernel reads along N)."""
    at = 1 if splats_last else 2  # where the grid axis goes
    diff = axis.view((1, -1, 1) if splats_last else (1, 1, -1)) - centres[:, k].unsqueeze(at)
    exponent = -(diff * diff) * inv_two_var.unsqueeze(at)
    # exp never sees an argument whose result is below the normal range (its slow path, even
    # for -inf: ~7x on x86), then what falls below the floor becomes exactly 0.
    return _floor(torch.exp(exponent.clamp(min=_LOG_PROFILE_FLOOR - 1.0)))


def _floor(profile: torch.Tensor) -> torch.Tensor:
    """``profile`` with every entry <= :data:`PROFILE_FLOOR` set to 0, NaN kept (in place
    unless autograd may need the original)."""
    keep = profile > PROFILE_FLOOR
    return profile * keep if torch.is_grad_enabled() else profile.mul_(keep)


def weighted_profile(centres, inv_two_var, axis, weights) -> torch.Tensor:
    """Each splat's weighted profile along x, (B, N, n), floored like :func:`_profile` (a tiny
    weight could make a subnormal product)."""
    return _floor(_profile(centres, inv_two_var, axis, 0) * weights[:, :, None])


def profiles(
    centres: torch.Tensor, weights: torch.Tensor, sigmas: torch.Tensor, axis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors of the separable render, each (B, N, n): the profiles along z and y and the
    weighted profile along x, every entry 0 or > :data:`PROFILE_FLOOR` (arguments as
    :func:`render_separable`); ``V[d, h, w] = sum_j gz[j, d] gy[j, h] gx[j, w]``."""
    inv_two_var = 1.0 / (2.0 * sigmas * sigmas)
    gx = weighted_profile(centres, inv_two_var, axis, weights)
    return _profile(centres, inv_two_var, axis, 2), _profile(centres, inv_two_var, axis, 1), gx


def render_sum_cpu(
    centres: torch.Tensor, weights: torch.Tensor, sigmas: torch.Tensor, axis: torch.Tensor
) -> torch.Tensor:
    """The (B, n, n, n) sum that :func:`render_separable` clamps, unclamped, by the CPU's
    windowed render (for inference: no autograd). Two of these added and clamped hold the same
    terms as one render of both sets of splats, summed in another order."""
    return _render_windowed(*profiles(centres, weights, sigmas, axis))


#: The CPU render works in slabs of SLAB planes along d, SLAB_GROUP slabs to one batched
#: product (slabs sorted by how many splats reach them, so little is padded). Render CPU time
#: per particle on v001's splats (2-core x86, one thread; docs/benchmarks.md): dense 3.9 ms,
#: slabs of 1: 3.6, of 2: 3.1, of 4: 2.5, of 8: 3.0.
SLAB = 4
SLAB_GROUP = 8


def _span(nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last + 1 index of each row's non-zero entries, flattened (empty: n, 0)."""
    n = nonzero.shape[-1]
    up = torch.arange(1, n + 1, dtype=torch.float32)  # (a max of ramps: faster than argmax)
    first = n - (nonzero * up.flip(0)).amax(-1)
    last = (nonzero * up).amax(-1)
    return first.long().reshape(-1), last.long().reshape(-1)


def _render_windowed(gz: torch.Tensor, gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """(B, n, n, n) unclamped sum of the factors (each (B, N, n), exact zeros where floored),
    computed slab by slab along d with only the splats non-zero in that slab, and only over the
    rows h and columns w some of them reach.

    Every term it leaves out is an exact zero, so the sum differs from the dense product only
    in the order float32 adds the same terms.
    """
    batch, n_splats, n = gz.shape
    if n_splats == 0:  # no splats (the free segment of a model without free ones)
        return gz.new_zeros(batch, n, n, n)
    slabs = -(-n // SLAB)
    pad = torch.nn.functional.pad
    # Row N of each particle, all zeros, pads a slab's splat list; gz_rows[(b * (N + 1) + j)
    # * slabs + s] is gz[b, j] over the planes of slab s.
    gz_rows = pad(gz, (0, slabs * SLAB - n, 0, 1)).reshape(-1, SLAB)
    gy_rows, gx_rows = (pad(g, (0, 0, 0, 1)).reshape(-1, n) for g in (gy, gx))
    y_first, y_last = _span(pad(gy > 0, (0, 0, 0, 1)))
    x_first, x_last = _span(pad(gx > 0, (0, 0, 0, 1)))
    cover = pad(gz > 0, (0, slabs * SLAB - n)).view(batch, n_splats, slabs, SLAB).any(-1)
    cover = cover.transpose(1, 2).reshape(-1, n_splats)  # (B * slabs, N)
    counts = cover.sum(1)
    # Each slab's splats first, in index order (the dense product's order of summation).
    members = torch.argsort(cover.to(torch.uint8), dim=1, descending=True, stable=True)
    order = torch.argsort(counts, descending=True)
    order = order[: int((counts > 0).sum())]  # slabs no splat reaches stay 0
    out = gx.new_zeros(batch * slabs, SLAB, n, n)
    for start in range(0, len(order), SLAB_GROUP):
        rows = order[start : start + SLAB_GROUP]
        k = int(counts[rows[0]])
        idx = members[rows, :k].masked_fill(torch.arange(k) >= counts[rows, None], n_splats)
        splat = ((rows // slabs) * (n_splats + 1))[:, None] + idx  # (G, k) rows of gy, gx
        flat = splat.reshape(-1)
        w0, w1 = int(x_first[flat].min()), int(x_last[flat].max())
        h0, h1 = int(y_first[flat].min()), int(y_last[flat].max())
        if w1 <= w0 or h1 <= h0:
            continue
        z = gz_rows.index_select(0, (splat * slabs + (rows % slabs)[:, None]).reshape(-1))
        y = gy_rows.index_select(0, flat)[:, h0:h1]
        planes = (z[:, :, None] * y[:, None, :]).view(len(rows), k, SLAB * (h1 - h0))
        x = gx_rows.index_select(0, flat).view(len(rows), k, n)[:, :, w0:w1]
        part = torch.bmm(planes.transpose(1, 2), x)
        out[rows, :, h0:h1, w0:w1] = part.view(len(rows), SLAB, h1 - h0, w1 - w0)
    return out.view(batch, slabs * SLAB, n, n)[:, :n].contiguous()  # a copy where padded


def fused_precision(device: torch.device) -> str | None:
    """The fused kernel's matrix-product precision on ``device``, or None where inference
    renders with cuBLAS (a CPU, ``GPU_RENDER = "cublas"``, no Triton, or a kernel that failed
    there before)."""
    if device.type != "cuda" or GPU_RENDER == "cublas" or _name(device) in _KERNEL_FAILED:
        return None
    if GPU_RENDER != "auto":
        return GPU_RENDER
    if not _has_triton():
        return None
    return "tf32x3" if torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"


def _name(device: torch.device) -> str:
    """``cuda:N`` for ``cuda`` and ``cuda:N`` alike (``cuda`` is the current device)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index}"


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _render_fused(centres, gx_w, inv_two_var, axis, precision) -> torch.Tensor | None:
    """The clamped (B, n*n, n) render by the Triton kernel (``gx_w``: the weighted (B, N, n)
    profiles along x); None, with a warning once a device, where it cannot be built or run."""
    try:
        kernel = importlib.import_module("cryolens.model.render_kernel")
        if axis.shape[0] > kernel.MAX_AXIS:  # larger than the kernel's tile: cuBLAS renders
            return None
        gz_t, gy_t = (_profile(centres, inv_two_var, axis, k, splats_last=True) for k in (2, 1))
        return kernel.render(gz_t, gy_t, gx_w.contiguous(), precision)
    except Exception as exc:  # any build or launch failure: cuBLAS renders instead
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        _KERNEL_FAILED[_name(centres.device)] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"the fused Triton render could not run on {centres.device} "
                      f"({type(exc).__name__}: {str(exc)[:200]}); rendering with cuBLAS "
                      "instead", RuntimeWarning, stacklevel=3)
        return None


def _planes(gz: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """(B, N, n) x (B, N, n) -> (B, N, n*n): each splat's (d, h) profile product."""
    batch, n_splats, n = gz.shape
    return (gz[:, :, :, None] * gy[:, :, None, :]).reshape(batch, n_splats, n * n)


class _OuterSum(torch.autograd.Function):
    """``V[b, d*n + h, w] = sum_j gz[b,j,d] gy[b,j,h] gx[b,j,w]`` with a hand-written backward.

    Autograd through the broadcast product keeps and re-broadcasts (B, N, n, n) tensors; here
    the backward is two matrix products and two small contractions, about twice as fast for
    training, and the planes are recomputed instead of stored.
    """

    @staticmethod
    def forward(ctx, gz, gy, gx):
        ctx.save_for_backward(gz, gy, gx)
        return torch.bmm(_planes(gz, gy).transpose(1, 2), gx)

    @staticmethod
    def backward(ctx, grad):
        gz, gy, gx = ctx.saved_tensors
        batch, n_splats, n = gz.shape
        grad = grad.contiguous()
        d_gx = torch.bmm(_planes(gz, gy), grad)  # (B, N, n)
        # t[b, j, d, h] = sum_w grad[b, (d, h), w] gx[b, j, w]
        t = torch.bmm(gx, grad.transpose(1, 2)).reshape(batch, n_splats, n, n)
        d_gz = torch.matmul(t, gy[..., None])[..., 0]
        d_gy = torch.matmul(gz[:, :, None, :], t)[:, :, 0]
        return d_gz, d_gy, d_gx


def render_dense(
    centres: torch.Tensor,
    weights: torch.Tensor,
    sigmas: torch.Tensor,
    axis: torch.Tensor,
    chunk: int = 4096,
) -> torch.Tensor:
    """The plain renderer, written the obvious way: every voxel against every splat.

    Same arguments and result as :func:`render_separable`. Slow and memory-hungry; it exists to
    test the fast path, so it computes (p - c)^2 directly rather than CryoLens's expanded form.
    """
    batch, _, _ = centres.shape
    n = axis.shape[0]
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # (n^3, 3) as (x, y, z)
    out = torch.empty(batch, points.shape[0], dtype=centres.dtype, device=centres.device)
    two_var = 2.0 * sigmas * sigmas  # (B, N)
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk]  # (P, 3)
        d2 = ((p[None, :, None, :] - centres.transpose(1, 2)[:, None, :, :]) ** 2).sum(-1)
        expo = torch.clamp(-d2 / two_var[:, None, :], min=EXPONENT_FLOOR)
        out[:, start : start + chunk] = (weights[:, None, :] * torch.exp(expo)).sum(-1)
    return out.reshape(batch, n, n, n).clamp(0.0, 1.0)
