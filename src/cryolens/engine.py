"""The inference engine: numpy particles in, numpy embeddings, reconstructions and splats out.

Every operation is batch-native: it takes ``(N, D, H, W)`` volumes and returns arrays with a
leading ``N``. Work is chunked by a memory budget and runs under ``torch.inference_mode``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cryolens.errors import DeviceError, InputError
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.model.rotation import axis_angle_to_quaternion

#: Default working-memory budget per chunk of particles (bytes), overridable per engine.
DEFAULT_MEMORY_BUDGET = 512 * 1024**2
#: Most particles per chunk: larger chunks only lose cache locality (bench/engine.py: on a
#: 2-core CPU features fall from ~2,900/s at 32 to ~1,200/s at 128; on an H200 reconstruct
#: from ~1,800/s to ~1,250/s).
DEFAULT_MAX_CHUNK = 32
#: CryoLens adds this to the standard deviation before dividing (spec.md c.1).
NORM_EPS = 1e-6
SEGMENT_AFFINITY, SEGMENT_FREE = 0, 1


@dataclass
class Normalised:
    """z-scored volumes (N, D, H, W) float32 and the per-particle mean and std (N,) float32."""

    volumes: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclass
class Features:
    """Encoder outputs per particle.

    embedding, log_var: (N, latent) float32 — mu and log-variance of the latent Gaussian;
    pose_axis_angle: (N, 4) raw pose head (angle in radians, then an unnormalised axis x, y, z);
    pose_quaternion: (N, 4) (w, x, y, z), unit for any non-degenerate axis;
    global_weight: (N,) raw logit; the decoder scales splat weights by its sigmoid.
    """

    embedding: np.ndarray
    log_var: np.ndarray
    pose_axis_angle: np.ndarray
    pose_quaternion: np.ndarray
    global_weight: np.ndarray


@dataclass
class Reconstruction:
    """volume: (N, S, S, S) float32; affinity/free: the two segments rendered on their own
    (same shape, or None when not asked for); features: the encoder outputs used."""

    volume: np.ndarray
    features: Features
    affinity: np.ndarray | None = None
    free: np.ndarray | None = None


@dataclass
class SplatSet:
    """Gaussian splats of each particle, in its predicted pose, in the particle's voxel frame.

    centres: (N, S, 3) float32, voxel coordinates (z, y, x) of the box (index units, so the box
    centre is (S-1)/2 = 23.5; splats may lie outside [0, S-1]); sigmas: (N, S) standard deviations
    in voxels; weights: (N, S) peak amplitudes as the renderer uses them (already scaled by
    sigmoid(global_weight)); segment: (S,) int8, 0 = affinity, 1 = free. The affinity splats come
    first. Rendering ``sum_j weights_j exp(-|p - centres_j|^2 / (2 sigmas_j^2))`` at voxel p and
    clamping to [0, 1] gives the decoder's raw render.
    """

    centres: np.ndarray
    sigmas: np.ndarray
    weights: np.ndarray
    segment: np.ndarray
    n_affinity: int
    n_free: int
    features: Features


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA where there is none is an error."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} was requested but this PyTorch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu or auto, or install a CUDA build of PyTorch"
        )
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or auto") from exc


def zscore(batch: np.ndarray) -> Normalised:
    """Per-particle z-score exactly as CryoLens: numpy float32 mean and population std of
    each (N, D, H, W) float32 volume, then ``(v - mean) / (std + 1e-6)`` in float32."""
    mean = np.empty(len(batch), np.float32)
    std = np.empty(len(batch), np.float32)
    out = np.empty_like(batch)
    for i, volume in enumerate(batch):
        # One volume at a time: numpy's float32 pairwise sums then match CryoLens to the bit.
        mean[i] = volume.mean()
        std[i] = volume.std()
        np.divide(volume - mean[i], std[i] + np.float32(NORM_EPS), out=out[i])
    return Normalised(out, mean, std)


class Engine:
    """A loaded CryoLens model and the batch operations on it."""

    def __init__(
        self,
        model: CryoLensVAE,
        *,
        device: str | torch.device = "auto",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        checkpoint=None,
        allow_tf32: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal products are ~100x slower on x86
        elif self.device.type == "cuda" and not allow_tf32:
            # cuDNN convolutions default to TF32 (10-bit mantissa): ~1e-3 relative error in the
            # encoder, far outside CryoLens parity. Full float32 costs little at these sizes.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = model.to(self.device).eval()
        self.config: CryoLensConfig = model.config
        self.memory_budget = int(memory_budget)
        self.max_chunk = int(max_chunk)
        self.checkpoint = checkpoint

    @classmethod
    def from_checkpoint(
        cls, source: str | os.PathLike = "demo", *, device: str = "auto", cache_dir=None, **kwargs
    ) -> Engine:
        """Load a named checkpoint (``demo``, ``v001``), an http(s) URL or a local file."""
        from cryolens.checkpoints import load_model

        model, info = load_model(source, device="cpu", cache_dir=cache_dir)
        return cls(model, device=device, checkpoint=info, **kwargs)

    # -- input ----------------------------------------------------------------------------
    @property
    def box_shape(self) -> tuple[int, int, int]:
        return (self.config.box_size,) * 3

    def _as_batch(self, volumes) -> np.ndarray:
        try:
            array = np.asarray(volumes)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise InputError(f"volumes must be a regular (N, D, H, W) array: {exc}",
                             field="volumes") from exc
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1:] != self.box_shape:
            raise InputError(
                f"volumes must have shape (N, {', '.join(map(str, self.box_shape))}), "
                f"got {tuple(array.shape)}",
                field="volumes",
            )
        if array.shape[0] == 0:
            raise InputError("at least one volume is needed", field="volumes")
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise InputError(f"volumes must be real numbers, got dtype {array.dtype}", "volumes")
        with np.errstate(over="ignore"):  # beyond float32 range becomes inf, reported below
            array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InputError(
                "volumes must be finite: found NaN or infinity (or a value beyond float32 range)",
                field="volumes",
            )
        return array

    def normalise(self, volumes) -> Normalised:
        """Check ``volumes`` and z-score each particle (see :func:`zscore`)."""
        return zscore(self._as_batch(volumes))

    # -- chunking -------------------------------------------------------------------------
    def _bytes_per_particle(self, n_render: int) -> int:
        cfg = self.config
        planes = cfg.n_splats * n_render * n_render  # the renderer's largest temporary
        volumes = 6 * n_render**3  # render, spectrum (complex), outputs
        encoder = 2 * 8 * (cfg.box_size // 2) ** 3
        return 4 * (planes + volumes + encoder)

    def _chunks(self, n: int, n_render: int) -> Iterator[slice]:
        size = max(1, min(self.max_chunk, self.memory_budget // self._bytes_per_particle(n_render)))
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    # -- operations -----------------------------------------------------------------------
    def features(self, volumes) -> Features:
        """Encode (N, D, H, W) particles; see :class:`Features`."""
        norm = self.normalise(volumes)
        parts = []
        with torch.inference_mode():
            for part in self._chunks(len(norm.volumes), 1):
                parts.append(self._encode(norm.volumes[part])[1])
        return _concat_features(parts)

    def _encode(self, normalised: np.ndarray):
        enc = self.model.encode(self._tensor(normalised))
        return enc, Features(
            embedding=_np(enc.mu),
            log_var=_np(enc.log_var),
            pose_axis_angle=_np(enc.pose),
            pose_quaternion=_np(axis_angle_to_quaternion(enc.pose)),
            global_weight=_np(enc.global_weight[:, 0]),
        )

    def reconstruct(
        self,
        volumes,
        *,
        use_predicted_pose: bool = False,
        final_convolution: bool = True,
        segments: bool = False,
        denormalise: bool = True,
    ) -> Reconstruction:
        """Decode each particle's embedding (mu) to a (box)^3 volume.

        Defaults follow CryoLens's pipeline: the "identity" pose and global-weight logit 1.0,
        the final convolution on, and the result de-normalised with the particle's own mean and
        std (``x * std + mean``). ``use_predicted_pose`` decodes in the particle's predicted pose
        and global weight instead; ``final_convolution=False`` returns the centre of the raw
        [0, 1] render; ``segments`` also renders the affinity and free splats on their own.
        """
        norm = self.normalise(volumes)
        decoder = self.model.decoder
        region = "conv" if final_convolution else "crop"
        outputs: dict[str, list[np.ndarray]] = {"volume": [], "affinity": [], "free": []}
        feats = []
        with torch.inference_mode():
            n_render = len(decoder.region_axis(region))
            for part in self._chunks(len(norm.volumes), n_render):
                enc, feat = self._encode(norm.volumes[part])
                feats.append(feat)
                if use_predicted_pose:
                    pose, weight = enc.pose, enc.global_weight
                else:
                    pose, weight = self.model.identity_pose(len(enc.mu), self.device)
                splats = decoder.splats(enc.mu, pose, weight)
                groups = [("volume", splats)]
                if segments:
                    groups += [(name, splats.segment(name)) for name in ("affinity", "free")]
                for key, group in groups:
                    render = decoder.render(group, region)
                    if final_convolution:
                        render = decoder.final_convolution(render)
                    outputs[key].append(_np(render))
        result = {k: np.concatenate(v) if v else None for k, v in outputs.items()}
        if denormalise:
            scale, offset = norm.std[:, None, None, None], norm.mean[:, None, None, None]
            for key, value in result.items():
                if value is not None:
                    value *= scale
                    value += offset
        return Reconstruction(
            volume=result["volume"], features=_concat_features(feats),
            affinity=result["affinity"], free=result["free"],
        )

    def splats(self, volumes, *, include_free: bool = True) -> SplatSet:
        """The splats each particle decodes to, in its predicted pose; see :class:`SplatSet`."""
        norm = self.normalise(volumes)
        cfg = self.config
        half = (cfg.render_size - 1) / 2  # grid units -> render voxels
        centres, sigmas, weights, feats = [], [], [], []
        with torch.inference_mode():
            for part in self._chunks(len(norm.volumes), 1):
                enc, feat = self._encode(norm.volumes[part])
                feats.append(feat)
                splats = self.model.decoder.splats(enc.mu, enc.pose, enc.global_weight)
                if not include_free:
                    splats = splats.segment("affinity")
                # rows (x, y, z) -> columns (z, y, x), the array axes (d, h, w)
                xyz = splats.centres.flip(1).transpose(1, 2)
                centres.append(_np((xyz + 1) * half - cfg.margin))
                sigmas.append(_np(splats.sigmas * half))
                weights.append(_np(splats.weights))
        n_free = cfg.n_free if include_free else 0
        segment = np.repeat(np.array([SEGMENT_AFFINITY, SEGMENT_FREE], np.int8),
                            [cfg.n_affinity, n_free])
        return SplatSet(
            centres=np.concatenate(centres), sigmas=np.concatenate(sigmas),
            weights=np.concatenate(weights), segment=segment,
            n_affinity=cfg.n_affinity, n_free=n_free, features=_concat_features(feats),
        )


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _concat_features(feats: list[Features]) -> Features:
    return Features(**{
        name: np.concatenate([getattr(f, name) for f in feats])
        for name in Features.__dataclass_fields__
    })


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Engine",
    "Features",
    "Normalised",
    "Reconstruction",
    "SplatSet",
    "resolve_device",
    "zscore",
]
