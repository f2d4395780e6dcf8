"""The per-particle z-score the network expects: on the host as CryoLens does (numpy, bit-exact)
or on the engine's device (torch, one pass)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: CryoLens adds this to the standard deviation before dividing (spec.md c.1).
NORM_EPS = 1e-6


@dataclass
class Normalised:
    """z-scored volumes (N, D, H, W) float32 and the per-particle mean and std (N,) float32.

    Here and in the classes below, fields are numpy arrays for numpy input and torch tensors on
    the input's device for tensor input.
    """

    volumes: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def zscore(batch: np.ndarray) -> Normalised:
    """Per-particle z-score exactly as CryoLens: numpy float32 mean and population std of
    each (N, D, H, W) float32 volume, then ``(v - mean) / (std + 1e-6)`` in float32.

    Where float32 overflows (a mean or std that is not finite: squares beyond ~3e38, e.g. one
    voxel of 1e20 or values near 1e17) that particle alone is z-scored in float64 instead and
    its mean, std and normalised volume rounded to float32; every other particle is untouched,
    so ordinary input stays bit-exact with the reference.
    """
    mean = np.empty(len(batch), np.float32)
    std = np.empty(len(batch), np.float32)
    out = np.empty_like(batch)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
        for i, volume in enumerate(batch):
            # One volume at a time: numpy's float32 pairwise sums then match CryoLens to the bit.
            mean[i] = volume.mean()
            std[i] = volume.std()
            np.divide(volume - mean[i], std[i] + np.float32(NORM_EPS), out=out[i])
    for i in np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std))):
        mean[i], std[i], out[i] = _zscore_float64(batch[i])
    return Normalised(out, mean, std)


def _zscore_float64(volume: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    wide = volume.astype(np.float64)
    m, s = wide.mean(), wide.std()
    # |v - m| / s <= sqrt(voxels), and s <= half the range <= float32's largest: all finite.
    return np.float32(m), np.float32(s), ((wide - m) / (s + NORM_EPS)).astype(np.float32)


def zscore_tensor(volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The z-score on the device: (N, D, H, W) float32 -> normalised float32, mean and std (N,).

    All in float32, as :func:`zscore` but in one pass for the statistics (torch's Welford
    ``var_mean``) and none per particle: against it the difference is rounding (~1e-7
    relative on ordinary particles), and a constant volume normalises to exactly 0 where
    numpy's float32 mean leaves an O(0.1) residue (spec.md c.1). Where float32 overflows
    (values beyond ~1e19) or the input is not finite, that particle's std is not finite: the
    engine then z-scores the batch again with :func:`zscore`, which handles both.
    """
    var, mean = torch.var_mean(volumes, dim=(1, 2, 3), correction=0, keepdim=True)
    std = var.sqrt_()
    normalised = (volumes - mean).div_(std + NORM_EPS)
    return normalised, mean.reshape(-1), std.reshape(-1)
