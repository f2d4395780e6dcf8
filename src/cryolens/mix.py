"""Simulated training batches: the packaged real structures alone, or mixed with fresh
procedural shapes.

:class:`MixedStream` draws new random instances of the training families (:mod:`cryolens.shapes`)
every batch, each imaged twice (two poses, two noise draws: the contrastive term's positive
pair), beside particles of the real structures. In every stream batch ``s`` depends only on
(seed, s), so runs resume exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cryolens.synth import VOXEL_SIZE_A, ParticleSimulator, Structure, load_structures

__all__ = ["POSE_POINTS", "MixedStream", "SimulatedStream", "StepStream", "pose_points"]

#: Points per structure (or particle) that the pose loss compares.
POSE_POINTS = 256


def pose_points(structures: Sequence[Structure], rng: np.random.Generator,
                n_points: int = POSE_POINTS, voxel_size: float = VOXEL_SIZE_A
                ) -> tuple[np.ndarray, np.ndarray]:
    """(S, n_points, 3) points in voxels, rows (x, y, z), and (S, n_points) weights summing to
    1: a random subset of each structure (zero-weight padding when it has fewer points)."""
    points = np.zeros((len(structures), n_points, 3), np.float32)
    weights = np.zeros((len(structures), n_points), np.float32)
    for i, s in enumerate(structures):
        take = min(n_points, len(s.coords))
        pick = rng.choice(len(s.coords), size=take, replace=False)
        points[i, :take] = s.coords[pick] / voxel_size
        weights[i, :take] = s.weights[pick] / s.weights[pick].sum()
    return points, weights


class StepStream(torch.utils.data.IterableDataset):
    """Endless batches, :meth:`batch` of each step from ``start_step`` on; with DataLoader
    workers, worker k of n makes steps k, k + n, ..."""

    def __init__(self, settings, start_step: int) -> None:
        self.settings = settings
        self.start_step = start_step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers


def _batch_rng(settings, step: int) -> tuple[np.random.Generator, float]:
    """Step ``step``'s random generator and the SNR drawn from it first (log-uniform)."""
    rng = np.random.default_rng([settings.seed, step])
    return rng, float(np.exp(rng.uniform(np.log(settings.snr_min), np.log(settings.snr_max))))


class SimulatedStream(StepStream):
    """The packaged real structures (``settings.structures``, default all), labelled by index."""

    def structures(self) -> list[Structure]:
        """The structures simulated, in label order."""
        wanted = self.settings.structures
        return [x for x in load_structures() if not wanted or x.name in wanted]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        s = self.settings
        rng, snr = _batch_rng(s, step)
        max_angle = None
        if step < s.curriculum_steps:
            max_angle = s.start_angle + (180.0 - s.start_angle) * step / s.curriculum_steps
        sim = ParticleSimulator(self.structures(), snr=snr, max_angle=max_angle,
                                tilt_range=s.tilt_range, max_shift=s.max_shift,
                                seed=int(rng.integers(2**63)))
        b = sim.sample(s.batch_size)
        return {
            "particles": torch.from_numpy(b.particles),
            "target": torch.from_numpy(b.clean),
            "rotations": torch.from_numpy(b.rotations),
            "labels": torch.from_numpy(b.labels),
        }


class MixedStream(SimulatedStream):
    """Endless batches: ``real_share`` of each batch from the packaged structures (labels 0..13,
    the structure), the rest pairs of views of new instances of ``families`` (label 14 + pair).

    Yields particles, target (noise-free), rotations, labels, and ``pose_points`` /
    ``pose_weights`` (per particle, for the pose loss, since instances change every batch).
    """

    def __init__(self, settings, start_step: int) -> None:
        from cryolens.shapes import FAMILIES

        unknown = [f for f in settings.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
        if not 0 <= settings.real_share <= 1:
            raise ValueError(f"real_share must lie in [0, 1], got {settings.real_share}")
        super().__init__(settings, start_step)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        from cryolens.shapes import make_instance

        s = self.settings
        rng, snr = _batch_rng(s, step)
        real = self.structures()
        n_pairs = int(round(s.batch_size * (1 - s.real_share))) // 2 if s.families else 0
        n_real = s.batch_size - 2 * n_pairs
        picked = rng.integers(0, len(s.families), n_pairs)
        shapes = [make_instance(s.families[i], rng) for i in picked]
        labels = np.concatenate([rng.integers(0, len(real), n_real),
                                 len(real) + np.repeat(np.arange(n_pairs), 2)]).astype(np.int64)
        sim = ParticleSimulator(real + shapes, snr=snr, tilt_range=s.tilt_range,
                                max_shift=s.max_shift, seed=int(rng.integers(2**63)))
        b = sim.sample(len(labels), labels=labels)
        points, weights = pose_points(sim.structures, rng)
        return {
            "particles": torch.from_numpy(b.particles),
            "target": torch.from_numpy(b.clean),
            "rotations": torch.from_numpy(b.rotations),
            "labels": torch.from_numpy(b.labels),
            "pose_points": torch.from_numpy(points[labels]),
            "pose_weights": torch.from_numpy(weights[labels]),
        }
