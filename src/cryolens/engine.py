"""The inference engine: particles in, embeddings, reconstructions and splats out.

Every operation is batch-native: it takes ``(N, D, H, W)`` volumes and returns arrays with a
leading ``N``. numpy in gives numpy out; a ``torch.Tensor`` in (CPU or CUDA) gives tensors out,
on the input's device. Work is chunked by a memory budget and runs under
``torch.inference_mode``. On CUDA the particles are z-scored on the GPU and host transfers go
through reused pinned buffers on their own streams (the copies out of pinned memory on a thread
of the engine's own), overlapping the compute of other chunks; the decoder renders with one
fused Triton kernel (:mod:`cryolens.model.render_kernel`).

Here: the results' types and the operations. The input checks are in :mod:`cryolens.inputs`,
the z-score in :mod:`cryolens.zscore`, the device in :mod:`cryolens.devices`, the chunking and
the ways of running a batch in :mod:`cryolens.chunked` (all re-exported here).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from cryolens.chunked import MIN_PIPELINE_CHUNK, ChunkedRunner, host_numpy
from cryolens.devices import resolve_device
from cryolens.inputs import as_batch, at_least_one, switch, tensor_batch
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.model.rotation import axis_angle_to_quaternion
from cryolens.zscore import NORM_EPS, Normalised, zscore, zscore_tensor

#: Default working-memory budget per chunk of particles (bytes), overridable per engine.
DEFAULT_MEMORY_BUDGET = 512 * 1024**2
#: Most particles per chunk on a CPU: larger chunks only lose cache locality (v001 on a 2-core
#: CPU, one thread: reconstruct 4.8 ms a particle in chunks of 8, 5.5 in chunks of 32; features
#: the same from 4 to 32; earlier, features fell from ~2,900/s at 32 to ~1,200/s at 128).
DEFAULT_MAX_CHUNK = 8
#: On CUDA: large chunks (bench/engine.py on an H200, numpy in and out, batch 2048: 256 a chunk
#: reconstructs 17,800/s, 512 18,700/s, 1024 20,100/s); a numpy batch is still split in two at
#: least (see MIN_PIPELINE_CHUNK), so that copies overlap compute.
DEFAULT_CUDA_MAX_CHUNK = 1024
#: Default CUDA working-memory budget, capped at half the device memory free at start; the
#: estimate per particle (~10 MB) is two to three times what an H200 measured (3.7 MB).
DEFAULT_CUDA_MEMORY_BUDGET = 12 * 1024**3
SEGMENT_AFFINITY, SEGMENT_FREE = 0, 1
#: The volumes a reconstruction renders: the whole, then (with segments) each segment alone.
RENDERS = ("reconstruction", "affinity_reconstruction", "free_reconstruction")


@dataclass
class Features:
    """Encoder outputs per particle.

    Named as the server's answers name them (:mod:`cryolens.contract`).
    embedding, log_variance: (N, latent) float32 — mu and log-variance of the latent Gaussian;
    pose_axis_angle: (N, 4) raw pose head (angle in radians, then an unnormalised axis x, y, z);
    pose: (N, 4) unit quaternion (w, x, y, z), unit for any non-degenerate axis;
    global_weight: (N,) raw logit; the decoder scales splat weights by its sigmoid.
    """

    embedding: np.ndarray
    log_variance: np.ndarray
    pose_axis_angle: np.ndarray
    pose: np.ndarray
    global_weight: np.ndarray


@dataclass
class Reconstruction:
    """reconstruction: (N, S, S, S) float32; affinity_reconstruction, free_reconstruction: the
    two segments rendered on their own (same shape, or None when not asked for); features: the
    encoder outputs used; splats: the particles' splats in their predicted pose
    (:class:`SplatSet`, or None when not asked for)."""

    reconstruction: np.ndarray
    features: Features
    affinity_reconstruction: np.ndarray | None = None
    free_reconstruction: np.ndarray | None = None
    splats: SplatSet | None = None


@dataclass
class SplatSet:
    """Gaussian splats of each particle, in its predicted pose, in the particle's voxel frame.

    centers: (N, S, 3) float32, voxel coordinates (z, y, x) of the box (index units, so the box
    centre is (S-1)/2 = 23.5; splats may lie outside [0, S-1]); scales: (N, S) standard deviations
    in voxels; weights: (N, S) peak amplitudes as the renderer uses them (already scaled by
    sigmoid(global_weight)); segment: (S,) int8, 0 = affinity, 1 = free. The affinity splats come
    first. Rendering ``sum_j weights_j exp(-|p - centers_j|^2 / (2 scales_j^2))`` at voxel p and
    clamping to [0, 1] gives the decoder's raw render.
    """

    centers: np.ndarray
    scales: np.ndarray
    weights: np.ndarray
    segment: np.ndarray
    n_affinity: int
    n_free: int
    features: Features


#: Output fields of each operation, in the order they are produced.
_FEATURE_FIELDS = tuple(Features.__dataclass_fields__)


class Engine(ChunkedRunner):
    """A loaded CryoLens model and the batch operations on it.

    The engine takes ``model`` as it is: it is moved to ``device`` and put in eval mode in place
    (``nn.Module.to`` moves a module's own parameters), so two engines on different devices need
    two models (``copy.deepcopy(model)``), and a model being trained needs ``model.train()``
    again after it has been given to an engine. :meth:`from_checkpoint` loads a model of its own.

    ``exact_zscore`` (default: True on the CPU, False on CUDA) z-scores on the host with numpy,
    bit-exact with CryoLens; False z-scores on the engine's device (:func:`zscore_tensor`).
    On CUDA, unless ``allow_tf32``, each operation runs its convolutions and products in full
    float32 (torch's TF32 flags are switched off while it runs, then restored).
    """

    def __init__(
        self,
        model: CryoLensVAE,
        *,
        device: str | torch.device = "auto",
        memory_budget: int | None = None,
        max_chunk: int | None = None,
        checkpoint=None,
        allow_tf32: bool = False,
        exact_zscore: bool | None = None,
    ) -> None:
        allow_tf32 = switch("allow_tf32", allow_tf32)
        exact_zscore = None if exact_zscore is None else switch("exact_zscore", exact_zscore)
        if memory_budget is not None:
            memory_budget = at_least_one("memory_budget", memory_budget, "bytes")
        if max_chunk is not None:
            max_chunk = at_least_one("max_chunk", max_chunk, "particles")
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        self.config: CryoLensConfig = model.config
        if memory_budget is None and cuda:  # at most half of what is free now: no OOM on a
            free = torch.cuda.mem_get_info(self.device)[0]  # small or shared GPU
            memory_budget = min(DEFAULT_CUDA_MEMORY_BUDGET, free // 2)
        elif memory_budget is None:
            memory_budget = DEFAULT_MEMORY_BUDGET
        if max_chunk is None:
            max_chunk = DEFAULT_CUDA_MAX_CHUNK if cuda else DEFAULT_MAX_CHUNK
        self.memory_budget = int(memory_budget)
        self.max_chunk = int(max_chunk)
        self.checkpoint = checkpoint
        self.exact_zscore = (not cuda) if exact_zscore is None else bool(exact_zscore)
        self.allow_tf32 = allow_tf32
        super().__init__()

    @classmethod
    def from_checkpoint(
        cls, source: str | os.PathLike = "demo", *, device: str = "auto", cache_dir=None, **kwargs
    ) -> Engine:
        """Load a named checkpoint (``demo``, ``v001``), an http(s) URL or a local file."""
        from cryolens.checkpoints import load_model

        model, info = load_model(source, device="cpu", cache_dir=cache_dir)
        return cls(model, device=device, checkpoint=info, **kwargs)

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return (self.config.box_size,) * 3

    def normalise(self, volumes) -> Normalised:
        """Check ``volumes`` and z-score each particle (see :func:`zscore`; on an engine with
        ``exact_zscore=False``, :func:`zscore_tensor`). Tensors in give tensor fields out."""
        place = volumes.device if isinstance(volumes, torch.Tensor) else None
        if not self.exact_zscore:
            x = (torch.from_numpy(as_batch(volumes, self.box_shape)) if place is None
                 else tensor_batch(volumes, self.box_shape)).to(self.device, torch.float32)
            with torch.no_grad():  # not inference mode: callers may modify the results in place
                parts = zscore_tensor(x)
            if bool(torch.isfinite(parts[2]).all()):
                if place is None:
                    return Normalised(*(host_numpy(p) for p in parts))
                return Normalised(*(p.to(place) for p in parts))
            # Input that is not finite (refused there), or float32 overflow (values beyond
            # ~1e19): numpy's z-score, float64 where needed, as :meth:`_run` falls back.
        norm = zscore(as_batch(volumes, self.box_shape))
        return norm if place is None else Normalised(
            *(torch.from_numpy(a).to(place) for a in (norm.volumes, norm.mean, norm.std)))

    # -- operations -----------------------------------------------------------------------
    def _encode(self, normalised: torch.Tensor):
        enc = self.model.encode(normalised)
        return enc, {
            "embedding": enc.mu,
            "log_variance": enc.log_var,
            "pose_axis_angle": enc.pose,
            "pose": axis_angle_to_quaternion(enc.pose),
            "global_weight": enc.global_weight[:, 0],
        }

    def features(self, volumes) -> Features:
        """Encode (N, D, H, W) particles; see :class:`Features`."""
        outs, _ = self._run(volumes, 1, len(_FEATURE_FIELDS), lambda x, m, s: self._encode(x)[1])
        return _features(outs)

    def reconstruct(
        self,
        volumes,
        *,
        use_predicted_pose: bool = False,
        final_convolution: bool = True,
        segments: bool = False,
        denormalise: bool = True,
        with_splats: bool = False,
        include_free: bool = True,
    ) -> Reconstruction:
        """Decode each particle's embedding (mu) to a (box)^3 volume.

        Defaults follow CryoLens's pipeline: the "identity" pose and global-weight logit 1.0,
        the final convolution on, and the result de-normalised with the particle's own mean and
        std (``x * std + mean``, in float32; a particle whose result leaves float32's range is
        an InputError). ``use_predicted_pose`` decodes in the particle's predicted pose
        and global weight instead; ``final_convolution=False`` returns the centre of the raw
        [0, 1] render; ``segments`` also renders the affinity and free splats on their own.
        ``with_splats`` also returns what :meth:`splats` would (``include_free`` as there),
        from the same single pass of the encoder.
        """
        use_predicted_pose = switch("use_predicted_pose", use_predicted_pose)
        final_convolution = switch("final_convolution", final_convolution)
        segments = switch("segments", segments)
        denormalise = switch("denormalise", denormalise)
        with_splats = switch("with_splats", with_splats)
        include_free = switch("include_free", include_free)
        decoder = self.model.decoder
        region = "conv" if final_convolution else "crop"
        n_render = len(decoder.region_axis(region))

        def step(x, mean, std):
            enc, out = self._encode(x)
            if use_predicted_pose:
                pose, weight = enc.pose, enc.global_weight
            else:
                pose, weight = self.model.identity_pose(len(enc.mu), self.device)
            splats = decoder.splats(enc.mu, pose, weight)
            keys = RENDERS if segments else RENDERS[:1]
            renders = (decoder.render_segments(splats, region) if segments
                       else (decoder.render(splats, region),))
            for key, render in zip(keys, renders, strict=True):
                if final_convolution:
                    render = decoder.final_convolution(render)
                if denormalise:  # two float32 roundings, as numpy's ``*=`` then ``+=``
                    render = render.mul_(std[:, None, None, None]).add_(mean[:, None, None, None])
                out[key] = render
            if with_splats:
                self._splat_outputs(enc, include_free, out)
            return out

        n_outputs = len(_FEATURE_FIELDS) + 1 + 2 * segments + 3 * with_splats
        outs, place = self._run(volumes, n_render, n_outputs, step, renders=1 + 2 * segments)
        return Reconstruction(
            reconstruction=outs["reconstruction"], features=_features(outs),
            affinity_reconstruction=outs.get("affinity_reconstruction"),
            free_reconstruction=outs.get("free_reconstruction"),
            splats=self._splat_set(outs, place, include_free) if with_splats else None,
        )

    def _splat_outputs(self, enc, include_free: bool, out: dict) -> None:
        """Add the splats of encoder outputs ``enc``, in their predicted pose, to ``out``."""
        cfg = self.config
        half = (cfg.render_size - 1) / 2  # grid units -> render voxels
        splats = self.model.decoder.splats(enc.mu, enc.pose, enc.global_weight)
        if not include_free:
            splats = splats.segment("affinity")
        # rows (x, y, z) -> columns (z, y, x), the array axes (d, h, w)
        xyz = splats.centres.flip(1).transpose(1, 2)
        out["centers"] = (xyz + 1) * half - cfg.margin
        out["scales"] = splats.sigmas * half
        out["weights"] = splats.weights

    def _splat_set(self, outs: dict, place, include_free: bool) -> SplatSet:
        cfg = self.config
        n_free = cfg.n_free if include_free else 0
        segment = np.repeat(np.array([SEGMENT_AFFINITY, SEGMENT_FREE], np.int8),
                            [cfg.n_affinity, n_free])
        return SplatSet(
            centers=outs["centers"], scales=outs["scales"], weights=outs["weights"],
            segment=segment if place is None else torch.from_numpy(segment).to(place),
            n_affinity=cfg.n_affinity, n_free=n_free, features=_features(outs),
        )

    def splats(self, volumes, *, include_free: bool = True) -> SplatSet:
        """The splats each particle decodes to, in its predicted pose; see :class:`SplatSet`."""
        include_free = switch("include_free", include_free)

        def step(x, mean, std):
            enc, out = self._encode(x)
            self._splat_outputs(enc, include_free, out)
            return out

        outs, place = self._run(volumes, 1, len(_FEATURE_FIELDS) + 3, step)
        return self._splat_set(outs, place, include_free)


def _features(outs: dict) -> Features:
    return Features(**{name: outs[name] for name in _FEATURE_FIELDS})


__all__ = [
    "DEFAULT_CUDA_MAX_CHUNK",
    "DEFAULT_CUDA_MEMORY_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "MIN_PIPELINE_CHUNK",
    "NORM_EPS",
    "Engine",
    "Features",
    "Normalised",
    "Reconstruction",
    "SplatSet",
    "resolve_device",
    "zscore",
    "zscore_tensor",
]
