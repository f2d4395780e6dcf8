"""The inference engine: particles in, embeddings, reconstructions and splats out.

Every operation is batch-native: it takes ``(N, D, H, W)`` volumes and returns arrays with a
leading ``N``. numpy in gives numpy out; a ``torch.Tensor`` in (CPU or CUDA) gives tensors out,
on the input's device. Work is chunked by a memory budget and runs under
``torch.inference_mode``. On CUDA the particles are z-scored on the GPU and host transfers go
through reused pinned buffers on their own streams (the copies out of pinned memory on a thread
of the engine's own), overlapping the compute of other chunks; the decoder renders with one
fused Triton kernel (:mod:`cryolens.model.render_kernel`).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import numpy as np
import torch

from cryolens.errors import DeviceError, InputError
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.model.render import fused_precision
from cryolens.model.rotation import axis_angle_to_quaternion

#: Default working-memory budget per chunk of particles (bytes), overridable per engine.
DEFAULT_MEMORY_BUDGET = 512 * 1024**2
#: Most particles per chunk: larger chunks only lose cache locality (bench/engine.py: on a
#: 2-core CPU features fall from ~2,900/s at 32 to ~1,200/s at 128; on an H200 reconstruct
#: from ~1,800/s to ~1,250/s).
DEFAULT_MAX_CHUNK = 32
#: On CUDA: large chunks (bench/engine.py on an H200, numpy in and out, batch 2048: 256 a chunk
#: reconstructs 17,800/s, 512 18,700/s, 1024 20,100/s); a numpy batch is still split in two at
#: least (see MIN_PIPELINE_CHUNK), so that copies overlap compute.
DEFAULT_CUDA_MAX_CHUNK = 1024
#: Default CUDA working-memory budget, capped at half the device memory free at start; the
#: estimate per particle (~10 MB) is two to three times what an H200 measured (3.7 MB).
DEFAULT_CUDA_MEMORY_BUDGET = 12 * 1024**3
#: Numpy batches on CUDA are split in at least two chunks down to this size: one chunk leaves
#: nothing to overlap (H200, batch 512: one chunk 12,000/s, two 16,300/s).
MIN_PIPELINE_CHUNK = 128
#: CryoLens adds this to the standard deviation before dividing (spec.md c.1).
NORM_EPS = 1e-6
SEGMENT_AFFINITY, SEGMENT_FREE = 0, 1


@dataclass
class Normalised:
    """z-scored volumes (N, D, H, W) float32 and the per-particle mean and std (N,) float32.

    Here and in the classes below, fields are numpy arrays for numpy input and torch tensors on
    the input's device for tensor input.
    """

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
    (same shape, or None when not asked for); features: the encoder outputs used; splats: the
    particles' splats in their predicted pose (:class:`SplatSet`, or None when not asked for)."""

    volume: np.ndarray
    features: Features
    affinity: np.ndarray | None = None
    free: np.ndarray | None = None
    splats: SplatSet | None = None


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
    """``auto`` picks CUDA when available; ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where
    PyTorch has it). A device this machine does not have is a :class:`DeviceError`."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} was requested but this PyTorch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu or auto, or install a CUDA build of PyTorch"
        )
    try:
        target = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from exc
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(f"device {device!r} was requested but this machine has {count} CUDA "
                          f"GPU(s): use cuda:0 .. cuda:{count - 1}, cuda or auto")
    mps = getattr(torch.backends, "mps", None)
    if target.type == "mps" and mps is not None and mps.is_available():
        return target
    if target.type not in ("cpu", "cuda"):  # meta, xla, ...: no weights could live there
        raise DeviceError(f"device {device!r} is not available to the engine: use cpu, cuda, "
                          "cuda:N or auto")
    return target


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


#: Output fields of each operation, in the order they are produced.
_FEATURE_FIELDS = tuple(Features.__dataclass_fields__)
#: Host dtypes torch can read directly (converted to float32 while copying to pinned memory).
_TORCH_HOST_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "int16",
                                             "int32", "int64", "uint8")}


class Engine:
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
        allow_tf32 = _switch("allow_tf32", allow_tf32)
        exact_zscore = None if exact_zscore is None else _switch("exact_zscore", exact_zscore)
        if memory_budget is not None:
            memory_budget = _at_least_one("memory_budget", memory_budget, "bytes")
        if max_chunk is not None:
            max_chunk = _at_least_one("max_chunk", max_chunk, "particles")
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
        self._lock = threading.Lock()  # guards the pinned buffers, streams and thread below
        self._pinned: dict[str, torch.Tensor] = {}
        self._streams: tuple | None = None
        self._copier: ThreadPoolExecutor | None = None  # pinned -> numpy outputs, on CUDA

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

    def _check_shape(self, shape: tuple[int, ...], given: object) -> None:
        """``shape``: the batch's, after a single volume got its leading axis; ``given``: what
        the caller passed (named in the message)."""
        if len(shape) != 4 or tuple(shape[1:]) != self.box_shape:
            box = ", ".join(map(str, self.box_shape))
            what = (f"shape {tuple(given.shape)}" if getattr(given, "ndim", 0)
                    else f"a {type(given).__name__}")
            raise InputError(f"volumes must have shape (N, {box}) or ({box}) for one volume, "
                             f"got {what}", field="volumes")
        if shape[0] == 0:
            raise InputError("at least one volume is needed", field="volumes")

    def _host_batch(self, volumes) -> np.ndarray:
        """Shape- and dtype-checked (N, D, H, W) numpy array, not yet converted to float32."""
        try:
            array = np.asarray(volumes)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise InputError(f"volumes must be a regular (N, D, H, W) array: {exc}",
                             field="volumes") from exc
        self._check_shape(array[None].shape if array.ndim == 3 else array.shape,
                          array if array.ndim else volumes)
        if array.ndim == 3:
            array = array[None]
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise InputError(f"volumes must be real numbers, got dtype {array.dtype}", "volumes")
        return array

    def _tensor_batch(self, volumes: torch.Tensor) -> torch.Tensor:
        tensor = volumes.detach()
        self._check_shape((1, *tensor.shape) if tensor.ndim == 3 else tuple(tensor.shape), tensor)
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise InputError(f"volumes must be real numbers, got dtype {tensor.dtype}", "volumes")
        return tensor

    def _as_batch(self, volumes) -> np.ndarray:
        """Checked (N, D, H, W) C-contiguous float32 numpy array of finite values."""
        if isinstance(volumes, torch.Tensor):
            volumes = _host_array(self._tensor_batch(volumes))
        array = self._host_batch(volumes)
        with np.errstate(over="ignore"):  # beyond float32 range becomes inf, reported below
            array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InputError(_NOT_FINITE, field="volumes")
        return array

    def normalise(self, volumes) -> Normalised:
        """Check ``volumes`` and z-score each particle (see :func:`zscore`; on an engine with
        ``exact_zscore=False``, :func:`zscore_tensor`). Tensors in give tensor fields out."""
        place = volumes.device if isinstance(volumes, torch.Tensor) else None
        if not self.exact_zscore:
            x = (torch.from_numpy(self._as_batch(volumes)) if place is None
                 else self._tensor_batch(volumes)).to(self.device, torch.float32)
            with torch.no_grad():  # not inference mode: callers may modify the results in place
                parts = zscore_tensor(x)
            if bool(torch.isfinite(parts[2]).all()):
                if place is None:
                    return Normalised(*(_np(p) for p in parts))
                return Normalised(*(p.to(place) for p in parts))
            # Input that is not finite (refused there), or float32 overflow (values beyond
            # ~1e19): numpy's z-score, float64 where needed, as :meth:`_run` falls back.
        norm = zscore(self._as_batch(volumes))
        return norm if place is None else Normalised(
            *(torch.from_numpy(a).to(place) for a in (norm.volumes, norm.mean, norm.std)))

    # -- chunking -------------------------------------------------------------------------
    def _bytes_per_particle(self, n_render: int, n_outputs: int = 1) -> int:
        cfg = self.config
        # The cuBLAS renderer's largest temporary, its planes; the fused kernel builds them in
        # registers from the three profiles (and their temporaries), six (N, n) arrays.
        if fused_precision(self.device) is not None:
            planes = 6 * cfg.n_splats * n_render
        else:
            planes = cfg.n_splats * n_render * n_render
        volumes = 6 * n_render**3  # render, spectrum (complex), outputs
        encoder = 2 * 8 * (cfg.box_size // 2) ** 3
        total = 4 * (planes + volumes + encoder)
        if not self.exact_zscore:
            # z-score temporaries (float32 in and out), and the next chunk's input and the
            # previous chunk's outputs, in flight while this one computes.
            box = cfg.box_size**3
            total += 4 * box * (3 + n_outputs)
        return total

    def _chunks(self, n: int, n_render: int, n_outputs: int = 1, *, pipelined: bool = False
                ) -> Iterator[slice]:
        per_particle = self._bytes_per_particle(n_render, n_outputs)
        size = max(1, min(self.max_chunk, self.memory_budget // per_particle))
        if pipelined:  # two chunks at least, so that copying one overlaps computing the other
            size = min(size, max(-(-n // 2), MIN_PIPELINE_CHUNK))
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    # -- running a batch --------------------------------------------------------------------
    def _run(self, volumes, n_render: int, n_outputs: int, step
             ) -> tuple[dict, torch.device | None]:
        """Run ``step(normalised, mean, std) -> {name: (n, ...) tensor}`` over every chunk.

        Returns the outputs, whole-batch, as numpy arrays (numpy input) or as tensors on the
        input's device (tensor input), and that device (None for numpy).
        """
        place = volumes.device if isinstance(volumes, torch.Tensor) else None
        full_float32 = self.device.type == "cuda" and not self.allow_tf32
        with torch.inference_mode(), _full_float32() if full_float32 else contextlib.nullcontext():
            bad = None
            if not self.exact_zscore:
                if place is not None and place.type == self.device.type:
                    outs, flags = self._run_on_device(self._tensor_batch(volumes), n_render,
                                                      n_outputs, step)
                else:
                    host = (_host_array(self._tensor_batch(volumes)) if place is not None
                            else self._host_batch(volumes))
                    with self._lock:
                        outs, flags = self._run_pipelined(host, n_render, n_outputs, step)
                bad = _read_flags(flags)
            if bad is None or bad.pop("stats"):
                # Input that is not finite (checked there), or statistics beyond float32's
                # range: again, z-scored on the host with numpy (float64 where needed).
                outs, flags = self._run_exact(self._as_batch(volumes), n_render, n_outputs, step)
                bad = _read_flags(flags)
        self._raise_if_not_finite(bad, outs)
        if place is not None:
            outs = {k: _to(v, place) for k, v in outs.items()}
        return outs, place

    def _run_exact(self, batch: np.ndarray, n_render, n_outputs, step):
        norm = zscore(batch)
        mean, std = torch.from_numpy(norm.mean), torch.from_numpy(norm.std)
        outs: dict[str, np.ndarray] = {}
        for part in self._chunks(len(batch), n_render, n_outputs):
            results = step(self._tensor(norm.volumes[part]), mean[part].to(self.device),
                           std[part].to(self.device))
            for key, value in results.items():
                if key not in outs:
                    outs[key] = np.empty((len(batch), *value.shape[1:]), np.float32)
                outs[key][part] = _np(value)
        # Checked on the host afterwards: cheaper than a dozen small torch ops per chunk.
        return outs, {k: np.bool_(not np.isfinite(v).all()) for k, v in outs.items()}

    def _run_on_device(self, volumes: torch.Tensor, n_render, n_outputs, step):
        """Tensor input already on the engine's (non-CPU) device: no host transfer at all."""
        outs: dict[str, torch.Tensor] = {}
        flags: dict[str, torch.Tensor] = {}
        for part in self._chunks(len(volumes), n_render, n_outputs):
            x, mean, std = zscore_tensor(volumes[part].to(self.device, torch.float32))
            _flag(flags, "stats", std)
            results = step(x, mean, std)
            for key, value in results.items():
                _flag(flags, key, value)
                if key not in outs:
                    with torch.inference_mode(False):  # a tensor callers may modify in place
                        outs[key] = torch.empty((len(volumes), *value.shape[1:]),
                                                dtype=torch.float32, device=self.device)
                outs[key][part] = value
        return outs, flags

    def _run_pipelined(self, host: np.ndarray, n_render, n_outputs, step):
        """Host input, z-scored on the device; on CUDA a pipeline per chunk: host -> pinned ->
        device on one stream, compute on the current stream, device -> pinned on a third, then
        pinned -> the preallocated numpy outputs on a thread of the engine's own. Two pinned
        slots each way: while chunk k computes, chunk k+1 is copied into pinned memory here
        and chunk k-1 out of it there."""
        cuda = self.device.type == "cuda"
        if host.dtype not in _TORCH_HOST_DTYPES or not host.flags.c_contiguous:
            with np.errstate(over="ignore"):  # beyond float32 range: inf, caught as input
                host = np.ascontiguousarray(host, dtype=np.float32)
        if cuda:
            if self._streams is None:
                self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
                self._copier = ThreadPoolExecutor(1, thread_name_prefix="cryolens-copy-out")
            copy_in, copy_out = self._streams
            compute = torch.cuda.current_stream(self.device)
        else:
            copy_in = copy_out = compute = None
        n = len(host)
        chunks = list(self._chunks(n, n_render, n_outputs, pipelined=cuda))
        size = chunks[0].stop - chunks[0].start
        pin_in = self._staging("in", (2, size, *self.box_shape))
        source = torch.from_numpy(host) if host.flags.writeable else _readonly_tensor(host)
        outs: dict[str, np.ndarray] = {}
        flags: dict[str, torch.Tensor] = {}
        pin_out: dict[str, torch.Tensor] = {}
        in_free = [None, None]  # events: the H2D copy from that pinned slot has finished
        copied: list[Future | None] = [None, None]  # that slot's copy into the numpy outputs

        def copy_to_outputs(part: slice, slot: int, ready, staged: list) -> None:
            _wait(ready)  # the D2H copy into the slot has finished
            with torch.inference_mode():
                for key, buffer in staged:
                    torch.from_numpy(outs[key][part]).copy_(buffer[slot, : part.stop - part.start])

        try:
            for i, part in enumerate(chunks):
                slot, m = i % 2, part.stop - part.start
                _wait(in_free[slot])
                pin_in[slot, :m].copy_(source[part])  # converts dtype; multi-threaded
                with _on(copy_in):
                    x = pin_in[slot, :m].to(self.device, non_blocking=True)
                    in_free[slot] = _record(copy_in)
                if cuda:
                    compute.wait_event(in_free[slot])
                    x.record_stream(compute)
                x, mean, std = zscore_tensor(x)
                _flag(flags, "stats", std)
                results = step(x, mean, std)
                for key, value in results.items():
                    _flag(flags, key, value)
                done = _record(compute)
                _result(copied[slot])  # chunk k-2 has left this slot's pinned buffers
                with _on(copy_out):
                    if cuda:
                        copy_out.wait_event(done)
                    for key, value in results.items():
                        if key not in outs:
                            outs[key] = np.empty((n, *value.shape[1:]), np.float32)
                            pin_out[key] = self._staging(f"out:{key}",
                                                         (2, size, *value.shape[1:]))
                        pin_out[key][slot, :m].copy_(value, non_blocking=True)
                        if cuda:
                            value.record_stream(copy_out)
                    ready = _record(copy_out)
                staged = list(pin_out.items())
                if cuda:
                    copied[slot] = self._copier.submit(copy_to_outputs, part, slot, ready, staged)
                else:  # every step above has run: nothing to overlap
                    copy_to_outputs(part, slot, ready, staged)
            for future in copied:
                _result(future)
        finally:  # after an error too: no copy may still read the pinned buffers
            futures_wait([f for f in copied if f is not None and not f.cancel()])
        return outs, flags

    def _staging(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 host buffer of ``shape``, pinned on CUDA, kept and reused between calls
        (grown when a larger one is needed)."""
        numel = int(np.prod(shape))
        buffer = self._pinned.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32,
                                 pin_memory=self.device.type == "cuda")
            self._pinned[name] = buffer
        return buffer[:numel].view(shape)

    def _raise_if_not_finite(self, bad: dict[str, bool], outs: dict) -> None:
        """Any output that is not finite: an InputError naming the particles, never a NaN or
        infinity handed back. ``bad``: each output's flag, which may be a false alarm (a sum
        beyond float32's range), so the flagged outputs are checked element by element."""
        for key, is_bad in bad.items():
            if not is_bad:
                continue
            value = outs[key]
            finite = (np.isfinite(value) if isinstance(value, np.ndarray)
                      else torch.isfinite(value).cpu().numpy())
            rows = np.flatnonzero(~finite.reshape(len(finite), -1).all(axis=1)).tolist()
            if not rows:
                continue
            hint = (" De-normalising (x * std + mean) left float32's range: the particle's "
                    "values are too large for it. Divide them by a constant (each particle is "
                    "z-scored, so its scale does not change the model's result), or in Python "
                    "ask for normalised units (denormalise=False)."
                    if key in ("volume", "affinity", "free") else "")
            raise InputError(
                f"the {key} of particle(s) {rows[:10]} is not finite (NaN or infinity).{hint}",
                field="volumes",
            )

    # -- operations -----------------------------------------------------------------------
    def _encode(self, normalised: torch.Tensor):
        enc = self.model.encode(normalised)
        return enc, {
            "embedding": enc.mu,
            "log_var": enc.log_var,
            "pose_axis_angle": enc.pose,
            "pose_quaternion": axis_angle_to_quaternion(enc.pose),
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
        use_predicted_pose = _switch("use_predicted_pose", use_predicted_pose)
        final_convolution = _switch("final_convolution", final_convolution)
        segments = _switch("segments", segments)
        denormalise = _switch("denormalise", denormalise)
        with_splats = _switch("with_splats", with_splats)
        include_free = _switch("include_free", include_free)
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
            keys = ("volume", "affinity", "free") if segments else ("volume",)
            renders = (decoder.render_segments(splats, region) if segments
                       else (decoder.render(splats, region),))
            for key, render in zip(keys, renders):
                if final_convolution:
                    render = decoder.final_convolution(render)
                if denormalise:  # two float32 roundings, as numpy's ``*=`` then ``+=``
                    render = render.mul_(std[:, None, None, None]).add_(mean[:, None, None, None])
                out[key] = render
            if with_splats:
                self._splat_outputs(enc, include_free, out)
            return out

        n_outputs = len(_FEATURE_FIELDS) + 1 + 2 * segments + 3 * with_splats
        outs, place = self._run(volumes, n_render, n_outputs, step)
        return Reconstruction(
            volume=outs["volume"], features=_features(outs),
            affinity=outs.get("affinity"), free=outs.get("free"),
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
        out["centres"] = (xyz + 1) * half - cfg.margin
        out["sigmas"] = splats.sigmas * half
        out["weights"] = splats.weights

    def _splat_set(self, outs: dict, place, include_free: bool) -> SplatSet:
        cfg = self.config
        n_free = cfg.n_free if include_free else 0
        segment = np.repeat(np.array([SEGMENT_AFFINITY, SEGMENT_FREE], np.int8),
                            [cfg.n_affinity, n_free])
        return SplatSet(
            centres=outs["centres"], sigmas=outs["sigmas"], weights=outs["weights"],
            segment=segment if place is None else torch.from_numpy(segment).to(place),
            n_affinity=cfg.n_affinity, n_free=n_free, features=_features(outs),
        )

    def splats(self, volumes, *, include_free: bool = True) -> SplatSet:
        """The splats each particle decodes to, in its predicted pose; see :class:`SplatSet`."""
        include_free = _switch("include_free", include_free)

        def step(x, mean, std):
            enc, out = self._encode(x)
            self._splat_outputs(enc, include_free, out)
            return out

        outs, place = self._run(volumes, 1, len(_FEATURE_FIELDS) + 3, step)
        return self._splat_set(outs, place, include_free)


_NOT_FINITE = "volumes must be finite: found NaN or infinity (or a value beyond float32 range)"


def _switch(name: str, value: object) -> bool:
    """An on/off argument, which must be a bool: the string "false" (from a config file, say)
    is truthy, and would silently mean the opposite."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputError(f"{name} must be True or False, got {type(value).__name__} "
                     f"{repr(value)[:40]}", field=name)


def _at_least_one(name: str, value: object, unit: str) -> int:
    """A positive whole number of ``unit`` (a float such as 2e9 is taken as an int)."""
    if (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value) and value >= 1):
        return int(value)
    raise InputError(f"{name} must be a number of {unit}, at least 1, got "
                     f"{type(value).__name__} {repr(value)[:40]}", field=name)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _to(value, place: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(place)
    return value.to(place)


def _flag(flags: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Accumulate, on the device and without a sync, whether ``value`` may have an entry that is
    not finite: its sum is not (one fused reduction; a sum that overflows is a false alarm,
    which :meth:`Engine._raise_if_not_finite` tells apart)."""
    bad = ~torch.isfinite(value.sum())
    flags[key] = bad if key not in flags else flags[key] | bad


def _read_flags(flags: dict) -> dict[str, bool]:
    """The flags as bools: one host sync for all of them (numpy ones are read as they are)."""
    names = list(flags)
    if all(isinstance(flag, np.bool_) for flag in flags.values()):
        return {k: bool(flags[k]) for k in names}
    return dict(zip(names, torch.stack([flags[k] for k in names]).cpu().tolist(), strict=True))


_FLOAT32_LOCK = threading.Lock()
_float32_users = 0
_tf32_saved: tuple[bool, bool] = (False, False)


@contextlib.contextmanager
def _full_float32():
    """While any engine operation runs on CUDA (``allow_tf32=False``): cuDNN convolutions and
    cuBLAS products in full float32. cuDNN defaults to TF32 (10-bit mantissa): ~1e-3 relative
    error in the encoder, far outside CryoLens parity; full float32 costs little at these
    sizes. torch's flags are process-wide, so they are set only for the duration (counted over
    threads: the last operation to finish restores what was there before)."""
    global _float32_users, _tf32_saved
    with _FLOAT32_LOCK:
        if _float32_users == 0:
            _tf32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _float32_users += 1
    try:
        yield
    finally:
        with _FLOAT32_LOCK:
            _float32_users -= 1
            if _float32_users == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = \
                    _tf32_saved


def _result(future: Future | None) -> None:
    if future is not None:
        future.result()


def _features(outs: dict) -> Features:
    return Features(**{name: outs[name] for name in _FEATURE_FIELDS})


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    return stream.record_event() if stream is not None else None


def _wait(event) -> None:
    if event is not None:
        event.synchronize()


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.cpu()
    if tensor.dtype in (torch.bfloat16, torch.uint16, torch.uint32, torch.uint64) or (
            tensor.dtype.is_floating_point and tensor.element_size() == 1):  # no numpy twin
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of a read-only array (only ever read here), without torch's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


__all__ = [
    "DEFAULT_CUDA_MAX_CHUNK",
    "DEFAULT_CUDA_MEMORY_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "Engine",
    "Features",
    "Normalised",
    "Reconstruction",
    "SplatSet",
    "resolve_device",
    "zscore",
    "zscore_tensor",
]
