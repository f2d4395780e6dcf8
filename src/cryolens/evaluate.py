"""Evaluation of a model on held-out simulated particles: reconstruction quality and embeddings.

Reports, per SNR, the Pearson correlation of the reconstruction (decoded in the predicted pose)
with the noise-free particle, the same for a Gaussian-blurred input, and 1-NN structure accuracy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cryolens.engine import Engine

#: Held-out particles come from this seed; training streams use (seed, step) seeds instead.
EVAL_SEED = 20261126
#: Blur of the baseline, in voxels: about the resolution the simulator's particles carry.
BASELINE_SIGMA = 1.5


@dataclass
class SnrReport:
    snr: float
    n_particles: int
    reconstruction_correlation: float  # mean over particles
    reconstruction_correlation_min: float
    blurred_input_correlation: float
    nn_accuracy: float  # leave-one-out 1-NN structure accuracy of the embeddings (mu)
    nn_accuracy_affinity: float  # the same on the affinity part of mu only


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-particle Pearson correlation of two (N, ...) stacks."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def gaussian_blur(volumes: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur of (N, S, S, S) volumes (periodic, via FFT)."""
    size = volumes.shape[-1]
    k = np.fft.fftfreq(size)
    kernel_1d = np.exp(-2 * (np.pi * sigma * k) ** 2)
    kernel = (kernel_1d[:, None, None] * kernel_1d[None, :, None]
              * kernel_1d[None, None, : size // 2 + 1])
    spectrum = np.fft.rfftn(volumes, axes=(1, 2, 3)) * kernel
    return np.fft.irfftn(spectrum, s=volumes.shape[1:], axes=(1, 2, 3)).astype(np.float32)


def nearest_neighbour_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy with Euclidean distance."""
    e = embeddings.astype(np.float64)
    d2 = (e * e).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2 * e @ e.T
    np.fill_diagonal(d2, np.inf)
    return float((labels[d2.argmin(1)] == labels).mean())


def evaluate(engine: Engine, *, snrs=(5.0, 1.0), per_structure: int = 20, seed: int = EVAL_SEED,
             png: Path | None = None) -> list[SnrReport]:
    from cryolens.synth import ParticleSimulator, load_structures

    structures = load_structures()
    labels = np.repeat(np.arange(len(structures)), per_structure)
    reports = []
    for i, snr in enumerate(snrs):
        sim = ParticleSimulator(structures, snr=snr, seed=seed + i)
        batch = sim.sample(len(labels), labels=labels)
        recon = engine.reconstruct(batch.particles, use_predicted_pose=True)
        corr = pearson(recon.reconstruction, batch.clean)
        blurred = pearson(gaussian_blur(batch.particles, BASELINE_SIGMA), batch.clean)
        emb = recon.features.embedding
        reports.append(SnrReport(
            snr=snr, n_particles=len(labels),
            reconstruction_correlation=float(corr.mean()),
            reconstruction_correlation_min=float(corr.min()),
            blurred_input_correlation=float(blurred.mean()),
            nn_accuracy=nearest_neighbour_accuracy(emb, batch.labels),
            nn_accuracy_affinity=nearest_neighbour_accuracy(
                emb[:, : engine.config.affinity_dims], batch.labels),
        ))
        if png is not None and i == 0:
            pick = [np.flatnonzero(batch.labels == s)[0] for s in range(len(structures))][:6]
            write_slices_png(png, batch.particles[pick], recon.reconstruction[pick],
                             batch.clean[pick])
    return reports


def format_table(reports: list[SnrReport]) -> str:
    header = ("| SNR | particles | reconstruction r (mean) | min | blurred input r | 1-NN acc "
              "| 1-NN acc (affinity) |")
    lines = [header,
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.snr:g} | {r.n_particles} | {r.reconstruction_correlation:.3f} | "
                     f"{r.reconstruction_correlation_min:.3f} | "
                     f"{r.blurred_input_correlation:.3f} | "
                     f"{100 * r.nn_accuracy:.1f} % | {100 * r.nn_accuracy_affinity:.1f} % |")
    return "\n".join(lines)


def write_report(path: Path, reports: list[SnrReport]) -> None:
    path.write_text(json.dumps([asdict(r) for r in reports], indent=2))


def write_slices_png(path: Path, inputs, recons, truths) -> None:
    """One row per particle: central z | y | x slices of the input, the reconstruction and the
    noise-free truth (the same figure code as ``cryolens show``)."""
    from cryolens.plots import slices_figure

    rows = [list(volumes) for volumes in zip(inputs, recons, truths, strict=True)]
    slices_figure(path, rows, ["input", "reconstruction", "noise-free truth"])
