"""(operation, volumes) -> named numpy arrays: the one layer every front end calls.

The HTTP routes (JSON and binary), the server's batching worker, the ``cryolens`` console and
other serving engines describe what they want as an :class:`Operation` (plain, hashable data)
and get a :class:`Result` back: arrays with a leading particle axis ``N`` under fixed names,
plus the few values shared by every particle. Front ends only rename and encode.

Names (per particle, leading ``N``):

========================== ============================================ ===================
name                       shape, meaning                               computed by
========================== ============================================ ===================
``embedding``              (N, latent) mu of the latent Gaussian        every operation
``log_variance``           (N, latent) its log-variance                 every operation
``pose``                   (N, 4) unit quaternion (w, x, y, z)          every operation
``pose_axis_angle``        (N, 4) raw pose head: angle (rad), axis      every operation
``global_weight``          (N,) raw logit                               every operation
``reconstruction``         (N, S, S, S) de-normalised, z-y-x            ``reconstruct``
``affinity_reconstruction``(N, S, S, S) affinity splats alone           ``segments=True``
``free_reconstruction``    (N, S, S, S) free splats alone               ``segments=True``
``centers``                (N, K, 3) splat centres, voxels (z, y, x)    ``splats`` or
``weights``                (N, K) peak amplitudes                       ``with_splats=True``
``scales``                 (N, K) standard deviations, voxels
========================== ============================================ ===================

Shared (no ``N``): ``segment`` (K,) int8 (0 affinity, 1 free), ``n_affinity``, ``n_free``,
``n_total`` (0-d int64), whenever splats are computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from cryolens.engine import Engine, Features, SplatSet

Kind = Literal["reconstruct", "features", "splats"]
KINDS: tuple[str, ...] = ("reconstruct", "features", "splats")


@dataclass(frozen=True)
class Operation:
    """What to compute for each particle. Only options that change the computation live here,
    so two requests with equal operations can run as one engine call (the server batches them).

    kind: ``reconstruct`` (decode to a volume), ``features`` (encoder outputs only) or
    ``splats`` (the splats each particle decodes to, in its predicted pose).
    use_predicted_pose: reconstruct in the predicted pose and global weight instead of
    CryoLens's canonical identity pose. final_convolution: apply the decoder's 9^3 convolution.
    segments: also render the affinity and free splats on their own. with_splats: a
    reconstruction also returns its particle's splats. include_free: splats include the free
    ones (``False``: affinity only).
    """

    kind: Kind = "features"
    use_predicted_pose: bool = False
    final_convolution: bool = True
    segments: bool = False
    with_splats: bool = False
    include_free: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"operation must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class Result:
    """``arrays``: name -> array with a leading particle axis; ``shared``: name -> array that
    holds for every particle (no leading axis). See the module docstring for the names."""

    arrays: dict[str, np.ndarray]
    shared: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, part: slice) -> Result:
        """The particles in ``part`` (views, no copy)."""
        return Result({k: v[part] for k, v in self.arrays.items()}, self.shared)

    def split(self, counts: list[int]) -> list[Result]:
        """One result per consecutive group of ``counts`` particles (for batched requests)."""
        out, start = [], 0
        for count in counts:
            out.append(self.take(slice(start, start + count)))
            start += count
        return out

    def named(self) -> dict[str, np.ndarray]:
        """Every array under its name, shared ones included."""
        return {**self.arrays, **self.shared}


def run(engine: Engine, operation: Operation, volumes) -> Result:
    """Run ``operation`` on ``volumes`` ((N, D, H, W) or one (D, H, W) particle)."""
    if operation.kind == "features":
        return Result(_feature_arrays(engine.features(volumes)))
    if operation.kind == "splats":
        return _splat_result(engine.splats(volumes, include_free=operation.include_free))
    rec = engine.reconstruct(volumes, use_predicted_pose=operation.use_predicted_pose,
                             final_convolution=operation.final_convolution,
                             segments=operation.segments, with_splats=operation.with_splats,
                             include_free=operation.include_free)
    result = Result({"reconstruction": rec.volume, **_feature_arrays(rec.features)})
    if operation.segments:
        result.arrays["affinity_reconstruction"] = rec.affinity
        result.arrays["free_reconstruction"] = rec.free
    if operation.with_splats:  # encoded once, with the reconstruction
        splats = _splat_result(rec.splats)
        result.arrays.update({k: splats.arrays[k] for k in SPLAT_ARRAYS})
        result.shared.update(splats.shared)
    return result


def run_batched(engine: Engine, operation: Operation, volumes: list[np.ndarray]) -> list[Result]:
    """Run one operation on several requests' volumes as one engine call, one result each.

    Every output depends only on its own particle; alone or batched, a request's numbers
    differ at most by float32 rounding, as CPU kernels round differently per batch size
    (``tests/test_server_worker.py`` checks rtol 1e-5 batched, exact when not)."""
    counts = [len(v) for v in volumes]
    stacked = volumes[0] if len(volumes) == 1 else np.concatenate(volumes)
    return run(engine, operation, stacked).split(counts)


SPLAT_ARRAYS = ("centers", "weights", "scales")


def _feature_arrays(feats: Features) -> dict[str, np.ndarray]:
    return {"embedding": feats.embedding, "log_variance": feats.log_var,
            "pose": feats.pose_quaternion, "pose_axis_angle": feats.pose_axis_angle,
            "global_weight": feats.global_weight}


def _splat_result(splats: SplatSet) -> Result:
    arrays = {"centers": splats.centres, "weights": splats.weights, "scales": splats.sigmas,
              **_feature_arrays(splats.features)}
    shared = {"segment": splats.segment, "n_affinity": np.int64(splats.n_affinity),
              "n_free": np.int64(splats.n_free),
              "n_total": np.int64(splats.n_affinity + splats.n_free)}
    return Result(arrays, {k: np.asarray(v) for k, v in shared.items()})


def statistics(values: np.ndarray) -> dict[str, float | list[int]]:
    """Mean, population std, min and max of any real array, computed in float64 (so a
    float32 volume's statistics do not lose digits), and its shape. Values beyond 1e150 are
    scaled down first, so sums and squares of any finite input stay finite.

    Memory: the float64 values exist :data:`STATISTICS_BLOCK` at a time (8 MiB), never for the
    whole array (a uint8 volume's float64 copy is 8x its size, and numpy's ``std`` makes a
    second one); the blocks' means and squared deviations are merged exactly as Chan, Golub and
    LeVeque's pairwise update does, which agrees with numpy's to float64 rounding."""
    data = np.asarray(values)
    flat = data.ravel(order="K")  # a view for any contiguous layout (Fortran order too)
    low, high = float(flat.min()), float(flat.max())
    scale = max(abs(low), abs(high))
    scale = scale if np.isfinite(scale) and scale > _SCALE_ABOVE else 1.0
    count, mean, squares = 0, 0.0, 0.0
    for start in range(0, flat.size, STATISTICS_BLOCK):
        block = flat[start:start + STATISTICS_BLOCK].astype(np.float64)
        if scale != 1.0:
            block /= scale
        size, block_mean = block.size, float(block.mean())
        block -= block_mean
        block_squares = float(np.dot(block, block))
        delta, total = block_mean - mean, count + size
        mean += delta * size / total
        squares += block_squares + delta * delta * count * size / total
        count = total
    return {"mean": mean * scale, "std": float(np.sqrt(squares / count)) * scale,
            "min": low, "max": high, "shape": list(data.shape)}


#: Values turned into float64 at a time by :func:`statistics` (8 MiB of float64).
STATISTICS_BLOCK = 1 << 20
#: Magnitude beyond which :func:`statistics` works on scaled values (squares reach 1e300).
_SCALE_ABOVE = 1e150


__all__ = ["KINDS", "SPLAT_ARRAYS", "Operation", "Result", "run",
           "run_batched", "statistics"]
