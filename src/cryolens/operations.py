"""(operation, volumes) -> named numpy arrays: the one layer every front end calls.

The HTTP routes (JSON and binary), the server's batching worker, the ``cryolens`` console and
other serving engines describe what they want as an :class:`Operation` (plain, hashable data)
and get a :class:`Result` back: arrays with a leading particle axis ``N`` under fixed names,
plus the few values shared by every particle. The names are the engine's result fields and
the wire's (:mod:`cryolens.contract`); front ends only encode.

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

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from cryolens.checked import CheckedVolumes
from cryolens.contract import KINDS, Kind, Operation

if TYPE_CHECKING:
    from cryolens.engine import Engine, SplatSet


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
    """Run ``operation`` on ``volumes`` ((N, D, H, W) or one (D, H, W) particle, or
    :class:`~cryolens.checked.CheckedVolumes`). The engine's results carry these names
    already: nothing is renamed here."""
    if operation.kind == "features":
        return Result(_arrays(engine.features(volumes)))
    if operation.kind == "splats":
        return _splat_result(engine.splats(volumes, include_free=operation.include_free))
    rec = engine.reconstruct(volumes, use_predicted_pose=operation.use_predicted_pose,
                             final_convolution=operation.final_convolution,
                             segments=operation.segments, with_splats=operation.with_splats,
                             include_free=operation.include_free)
    result = Result(_arrays(rec))
    if rec.splats is not None:  # encoded once, with the reconstruction
        splats = _splat_result(rec.splats)
        result.arrays.update({k: splats.arrays[k] for k in SPLAT_ARRAYS})
        result.shared.update(splats.shared)
    return result


def run_batched(engine: Engine, operation: Operation, volumes: list) -> list[Result]:
    """Run one operation on several requests' volumes as one engine call, one result each.

    Every output depends only on its own particle; alone or batched, a request's numbers
    differ at most by float32 rounding, as CPU kernels round differently per batch size
    (``tests/test_server_worker.py`` checks rtol 1e-5 batched, exact when not). Checked
    volumes stay checked when joined, so the engine does not check them again."""
    counts = [len(v) for v in volumes]
    if len(volumes) == 1:
        stacked = volumes[0]
    elif all(isinstance(v, CheckedVolumes) for v in volumes):
        stacked = CheckedVolumes.join(volumes)
    else:
        stacked = np.concatenate(volumes)
    return run(engine, operation, stacked).split(counts)


SPLAT_ARRAYS = ("centers", "weights", "scales")
#: Fields of the engine's results that hold the same for every particle.
_SHARED = ("segment", "n_affinity", "n_free")


def _arrays(output) -> dict[str, np.ndarray]:
    """The arrays of an engine result (and of the features inside it) under their own
    names, which are the wire's."""
    out: dict[str, np.ndarray] = {}
    for f in fields(output):
        value = getattr(output, f.name)
        if f.name == "features":
            out.update(_arrays(value))
        elif value is not None and f.name not in _SHARED and f.name != "splats":
            out[f.name] = value
    return out


def _splat_result(splats: SplatSet) -> Result:
    shared = {"segment": splats.segment, "n_affinity": np.int64(splats.n_affinity),
              "n_free": np.int64(splats.n_free),
              "n_total": np.int64(splats.n_affinity + splats.n_free)}
    return Result(_arrays(splats), {k: np.asarray(v) for k, v in shared.items()})


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


__all__ = ["KINDS", "SPLAT_ARRAYS", "Kind", "Operation", "Result", "run",
           "run_batched", "statistics"]
