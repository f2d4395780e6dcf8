"""The segmented splat decoder: latent -> affinity and free Gaussian splats -> rendered volume.

Affinity splats (the structure) are rotated by the pose; free splats (context, noise) are not.
Layer names and order match CryoLens's ``SegmentedGaussianSplatDecoder`` state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cryolens.model.config import FINAL_KERNEL, CryoLensConfig
from cryolens.model.render import render_separable, render_sum_cpu
from cryolens.model.rotation import pose_to_matrix

#: Which part of the render grid to draw. ``conv`` is what the final convolution reads for the
#: centre crop; ``crop`` is the centre box_size^3; ``full`` the whole padded grid.
Region = Literal["conv", "crop", "full"]


def _fft_valid_correlation(volume: torch.Tensor, kernel: torch.Tensor,
                           kernel_spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, n, n) valid cross-correlation with an (m, m, m) kernel -> (B, n-m+1, ...);
    ``kernel_spectrum``, where given, is :func:`_kernel_spectrum` of ``kernel`` for this n.

    A circular correlation of size n is exact here: output i reads inputs i..i+m-1 <= n-1. On
    a CPU the inverse transform runs one axis at a time, each cropped to the valid part before
    the next axis (on v001's 56^3 region the later axes transform 48 rather than 56 planes and
    rows); a GPU keeps the single 3-D transform, not measured against it here.
    """
    n = volume.shape[-1]
    out = n - kernel.shape[-1] + 1
    if kernel_spectrum is None:
        kernel_spectrum = _kernel_spectrum(kernel, n)
    spectrum = torch.fft.rfftn(volume, dim=(1, 2, 3)) * kernel_spectrum
    if volume.device.type != "cpu":
        return torch.fft.irfftn(spectrum, s=(n, n, n), dim=(1, 2, 3))[:, :out, :out, :out]
    spectrum = torch.fft.ifft(spectrum, dim=1)[:, :out]
    spectrum = torch.fft.ifft(spectrum, dim=2)[:, :, :out]
    return torch.fft.irfft(spectrum, n=n, dim=3)[..., :out]


def _kernel_spectrum(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The conjugate of ``kernel``'s real spectrum on an (n, n, n) grid."""
    return torch.fft.rfftn(kernel, s=(n, n, n)).conj().resolve_conj()


class SoftStep(nn.Module):
    """A steep sigmoid, ``1 / (1 + exp(-k x))``."""

    def __init__(self, k: float = 10.0) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.sigmoid(self.k * x)


class Negate(nn.Module):
    def forward(self, x):
        return -x


def _centroid_mlp(dims: int, n: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dims, 4 * n), nn.ReLU(), nn.Linear(4 * n, 3 * n), nn.ReLU(),
        nn.Linear(3 * n, 3 * n), nn.Tanh(),
    )


def _weight_mlp(dims: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dims, 2 * n), nn.ReLU(), nn.Linear(2 * n, n), nn.Tanh(),
                         SoftStep())


def _sigma_mlp(dims: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dims, 2 * n), nn.ReLU(), nn.Linear(2 * n, n), nn.Sigmoid())


@dataclass
class Splats:
    """Splats in the decoder's render frame.

    centres: (B, 3, N) rows (x, y, z) in grid units ([-1, 1] spans the render grid);
    weights: (B, N) in [0, 1], already scaled by sigmoid(global weight); sigmas: (B, N) grid units.
    The first ``n_affinity`` splats are the affinity segment.
    """

    centres: torch.Tensor
    weights: torch.Tensor
    sigmas: torch.Tensor
    n_affinity: int

    def segment(self, name: Literal["affinity", "free"]) -> Splats:
        part = slice(None, self.n_affinity) if name == "affinity" else slice(self.n_affinity, None)
        return Splats(self.centres[:, :, part], self.weights[:, part], self.sigmas[:, part],
                      self.n_affinity if name == "affinity" else 0)


class SegmentedSplatDecoder(nn.Module):
    def __init__(self, config: CryoLensConfig) -> None:
        super().__init__()
        self.config = config
        a, f = config.n_affinity, config.n_free
        self.affinity_centroids = _centroid_mlp(config.affinity_dims, a)
        self.affinity_weights = _weight_mlp(config.affinity_dims, a)
        self.affinity_sigmas = _sigma_mlp(config.affinity_dims, a)
        if f:
            self.free_centroids = _centroid_mlp(config.free_dims, f)
            self.free_weights = _weight_mlp(config.free_dims, f)
            self.free_sigmas = _sigma_mlp(config.free_dims, f)
        self._decoder = nn.Sequential(
            Negate(), nn.Conv3d(1, 1, 1), nn.Conv3d(1, 1, FINAL_KERNEL)
        )
        size = config.render_size
        # torch's float32 linspace, exactly as CryoLens builds its grid (numpy's differs by 1 ulp).
        self.register_buffer("grid_axis", torch.linspace(-1, 1, size), persistent=False)
        self.scale = size / config.box_size

    # -- splats ---------------------------------------------------------------------------
    def splats(self, z: torch.Tensor, pose: torch.Tensor, global_weight: torch.Tensor) -> Splats:
        """z: (B, latent); pose: (B, pose_dims) axis-angle; global_weight: (B, 1) logit."""
        cfg = self.config
        batch = z.shape[0]
        z_a = z[:, : cfg.affinity_dims]
        centres = self.affinity_centroids(z_a).reshape(batch, 3, cfg.n_affinity)
        centres = torch.bmm(pose_to_matrix(pose).to(centres.dtype), centres)
        weights = [self.affinity_weights(z_a)]
        raw_sigmas = [self.affinity_sigmas(z_a)]
        if cfg.n_free:
            z_f = z[:, cfg.affinity_dims :]
            free = self.free_centroids(z_f).reshape(batch, 3, cfg.n_free)
            centres = torch.cat([centres, free], 2)
            weights.append(self.free_weights(z_f))
            raw_sigmas.append(self.free_sigmas(z_f))
        amplitude = torch.sigmoid(global_weight).reshape(batch, 1)
        weight = torch.cat(weights, 1) * amplitude
        raw = torch.cat(raw_sigmas, 1)
        sigma = torch.clamp(raw * (cfg.sigma_max - cfg.sigma_min) + cfg.sigma_min, 1e-6, 1.0)
        return Splats(centres * self.scale, weight.clamp(0.0, 1.0), sigma, cfg.n_affinity)

    # -- rendering ------------------------------------------------------------------------
    def region_axis(self, region: Region) -> torch.Tensor:
        margin = self.config.margin
        if region == "full":
            return self.grid_axis
        if region == "crop":
            return self.grid_axis[margin:-margin]
        pad = margin - FINAL_KERNEL // 2
        return self.grid_axis[pad:-pad]

    def render(self, splats: Splats, region: Region) -> torch.Tensor:
        """(B, n, n, n) clamped render of ``splats`` over ``region``."""
        return render_separable(splats.centres, splats.weights, splats.sigmas,
                                self.region_axis(region))

    def render_segments(self, splats: Splats, region: Region
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clamped renders of all ``splats``, of the affinity segment and of the free one.

        For inference on a CPU the splats are rendered once, as two unclamped segments whose
        sum, clamped, is the whole render (the same terms added in another order: equal to
        float32 rounding); elsewhere each of the three is rendered on its own."""
        affinity, free = splats.segment("affinity"), splats.segment("free")
        if splats.centres.device.type != "cpu" or torch.is_grad_enabled():
            return tuple(self.render(group, region) for group in (splats, affinity, free))
        axis = self.region_axis(region)
        parts = [render_sum_cpu(group.centres, group.weights, group.sigmas, axis)
                 for group in (affinity, free)]
        volume = torch.add(*parts).clamp_(0.0, 1.0)
        return volume, parts[0].clamp_(0.0, 1.0), parts[1].clamp_(0.0, 1.0)

    def final_convolution(self, render: torch.Tensor, method: str = "auto") -> torch.Tensor:
        """(B, box + 8, ...) render of the ``conv`` region -> (B, box, box, box) output.

        Equivalent to CryoLens's conv stack on the full grid followed by its centre crop. The
        stack is affine, so it is applied as ``-w1 * (K (*) V) + (b1 * sum(K) + b2)``; on the
        CPU the 9^3 correlation runs through an FFT (about 10x faster than torch's conv3d
        there, with rounding error ~1e-7 of the output scale); ``direct`` forces conv3d.
        """
        if method == "auto":
            # cuDNN's conv (TF32 by default) is the fast choice for training on a GPU; the FFT
            # keeps float32 accuracy for inference everywhere and is fastest on a CPU.
            training_on_gpu = render.device.type != "cpu" and torch.is_grad_enabled()
            method = "direct" if training_on_gpu else "fft"
        if method == "direct":
            return self._decoder(render[:, None])[:, 0]
        point, spread = self._decoder[1], self._decoder[2]
        kernel = spread.weight[0, 0]
        correlated = _fft_valid_correlation(
            render, kernel, self._spectrum(spread.weight, render.shape[-1]))
        offset = point.bias * kernel.sum() + spread.bias
        return correlated * (-point.weight.reshape(())) + offset

    def _spectrum(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """:func:`_kernel_spectrum` of the final convolution's ``weight`` (1, 1, m, m, m), kept
        between calls where autograd does not need it (the kernel is then a fixed weight, and
        its transform costs half as much as the rest of a one-particle correlation). The entry
        is keyed on the weight's storage, version counter (bumped by every in-place change: an
        optimiser step, a ``load_state_dict``), device, dtype and n, so a changed or moved
        weight is transformed again."""
        if torch.is_grad_enabled() and weight.requires_grad:
            return _kernel_spectrum(weight[0, 0], n)
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, n)
        cached = self.__dict__.get("_spectrum_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                spectrum = _kernel_spectrum(weight.detach()[0, 0], n)
            cached = self.__dict__["_spectrum_cache"] = (key, spectrum)
        return cached[1]

    def forward(
        self,
        z: torch.Tensor,
        pose: torch.Tensor,
        global_weight: torch.Tensor,
        *,
        final_convolution: bool = True,
        segment: Literal["affinity", "free"] | None = None,
    ) -> torch.Tensor:
        """Decode to (B, box, box, box): final-conv output, or the centre crop of the raw render."""
        splats = self.splats(z, pose, global_weight)
        if segment is not None:
            splats = splats.segment(segment)
        if final_convolution:
            return self.final_convolution(self.render(splats, "conv"))
        return self.render(splats, "crop")
