"""Leave-family-out evaluation: how a model does on shapes and proteins it never trained on.

Per group (each shape family of :mod:`cryolens.shapes`, and real proteins kept out of training)
and SNR: reconstruction r against a Gaussian blur of the input with the best sigma for that
group, and embedding checks on the held-out groups (1-NN and 5-shot group accuracy, instance
retrieval). Fixed seeds: the particles depend only on (seed, SNR index, group, instance).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from cryolens.engine import Engine
from cryolens.evaluate import gaussian_blur, pearson
from cryolens.shapes import FAMILIES, HELD_OUT_FAMILIES, make_instance
from cryolens.synth import ParticleBatch, ParticleSimulator, Structure

__all__ = [
    "GENERALISATION_SEED",
    "HELD_OUT_GROUPS",
    "GroupReport",
    "best_blur",
    "evaluate_generalisation",
    "evaluation_set",
    "format_generalisation",
    "held_out_structures",
]

#: Seed of every leave-family-out evaluation set (training streams use (seed, step) seeds).
GENERALISATION_SEED = 20261207
#: The blurs (voxels) searched for the best-sigma baseline of each group.
SIGMA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
#: Group name of the real proteins kept out of training (``held_out_structures.npz``).
PROTEINS = "held-out proteins"
#: The groups never used in training: the held-out families, then the held-out proteins.
HELD_OUT_GROUPS = (*HELD_OUT_FAMILIES, PROTEINS)
#: Support particles per class of the few-shot check.
SHOTS = 5
#: The SNRs of the evaluation, in order (an SNR's position seeds its particles).
SNRS = (5.0, 1.0)


@dataclass
class GroupReport:
    group: str  # a family of cryolens.shapes, or PROTEINS
    held_out: bool  # never used in training
    snr: float
    n_particles: int
    model_r: float  # mean Pearson r of the reconstruction (predicted pose) with the truth
    model_r_min: float
    blur_r: float  # mean r of the input blurred with the best sigma for this group and SNR
    blur_sigma: float  # that sigma, voxels


@dataclass
class EmbeddingReport:
    """On the held-out groups only: each held-out family and each held-out protein a class."""

    snr: float
    n_particles: int
    nn_accuracy: float  # leave-one-out 1-NN class accuracy (Euclidean, embedding mu)
    nn_accuracy_families: float  # the same among the held-out families' particles only
    five_shot_accuracy: float  # nearest class mean of SHOTS support particles, on the rest
    instance_retrieval: float  # held-out family particles whose 1-NN is the other view


@lru_cache(maxsize=1)
def _held_out_structures() -> tuple[Structure, ...]:
    data = resources.files("cryolens.data")
    meta = json.loads((data / "held_out_structures.json").read_text())
    ids = {r["name"]: r["pdb_id"] for r in meta["structures"]}
    with (data / "held_out_structures.npz").open("rb") as fh, np.load(fh) as npz:
        return tuple(Structure(name=str(n), pdb_id=ids[str(n)],
                               coords=np.ascontiguousarray(npz[f"coords_{n}"], np.float32),
                               weights=np.ascontiguousarray(npz[f"weights_{n}"], np.float32))
                     for n in npz["names"])


def held_out_structures() -> list[Structure]:
    """The real proteins never used in training (``cryolens/data/held_out_structures.npz``)."""
    return list(_held_out_structures())


def evaluation_set(group: str, snr: float, n: int, *, snr_index: int = 0,
                   seed: int = GENERALISATION_SEED) -> tuple[ParticleBatch, np.ndarray]:
    """Particles of one group at one SNR, and their instance ids.

    A family gives ``n`` instances imaged twice each (instance ids 0, 0, 1, 1, ...), instance
    ``i`` drawn from ``(seed, family index, i)``; :data:`PROTEINS` gives ``n`` particles of each
    held-out protein (instance id = protein).
    """
    if group == PROTEINS:
        structures = held_out_structures()
        labels = np.repeat(np.arange(len(structures)), n)
        group_index = len(FAMILIES)
    else:
        group_index = list(FAMILIES).index(group)
        structures = [make_instance(group, np.random.default_rng([seed, group_index, i]))
                      for i in range(n)]
        labels = np.repeat(np.arange(n), 2)
    sim = ParticleSimulator(structures, snr=snr, seed=[seed, snr_index, group_index])
    return sim.sample(len(labels), labels=labels), labels


def fingerprint(batch: ParticleBatch) -> str:
    """A short digest of an evaluation set, tolerant of last-bit float differences."""
    h = hashlib.sha256()
    for array in (batch.clean, batch.rotations, batch.shifts):
        h.update(np.round(np.asarray(array, np.float64), 3).tobytes())
    return h.hexdigest()[:16]


def best_blur(particles: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """The mean r with ``clean`` of ``particles`` blurred with the best sigma of
    :data:`SIGMA_GRID`, and that sigma."""
    scores = [float(pearson(gaussian_blur(particles, s), clean).mean()) for s in SIGMA_GRID]
    best = int(np.argmax(scores))
    return scores[best], SIGMA_GRID[best]


def nn_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Leave-one-out 1-NN accuracy (Euclidean) and each sample's nearest neighbour."""
    e = embeddings.astype(np.float64)
    d2 = (e * e).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2 * e @ e.T
    np.fill_diagonal(d2, np.inf)
    nearest = d2.argmin(1)
    return float((labels[nearest] == labels).mean()), nearest


def few_shot_accuracy(embeddings: np.ndarray, labels: np.ndarray, shots: int = SHOTS,
                      seed: int = GENERALISATION_SEED) -> float:
    """Nearest-class-mean accuracy with ``shots`` random support samples per class, on the rest
    (a fixed draw of supports)."""
    rng = np.random.default_rng(seed)
    support = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        support[rng.choice(np.flatnonzero(labels == c), shots, replace=False)] = True
    classes = np.unique(labels)
    means = np.stack([embeddings[support & (labels == c)].mean(0) for c in classes])
    d2 = ((embeddings[~support, None, :] - means[None]) ** 2).sum(-1)
    return float((classes[d2.argmin(1)] == labels[~support]).mean())


def evaluate_generalisation(engine: Engine, *, snrs=SNRS, per_group: int = 16,
                            groups: tuple[str, ...] | None = None,
                            seed: int = GENERALISATION_SEED
                            ) -> tuple[list[GroupReport], list[EmbeddingReport]]:
    """Reconstruction per group and SNR, and embedding checks over the held-out groups.

    ``per_group``: instances per family (each imaged twice) and particles per held-out protein.
    """
    groups = groups or (*FAMILIES, PROTEINS)
    reports, embedding_reports = [], []
    for k, snr in enumerate(snrs):
        held_emb, held_class, held_instance = [], [], []
        for group in groups:
            batch, instance = evaluation_set(group, snr, per_group, snr_index=k, seed=seed)
            recon = engine.reconstruct(batch.particles, use_predicted_pose=True)
            r = pearson(recon.reconstruction, batch.clean)
            blur_r, sigma = best_blur(batch.particles, batch.clean)
            held = group in HELD_OUT_GROUPS
            reports.append(GroupReport(group=group, held_out=held, snr=snr,
                                       n_particles=len(r), model_r=float(r.mean()),
                                       model_r_min=float(r.min()), blur_r=blur_r,
                                       blur_sigma=sigma))
            if held:
                held_emb.append(recon.features.embedding)
                name = np.array([f"{group}:{i}" if group == PROTEINS else group
                                 for i in instance])
                held_class.append(name)
                held_instance.append(np.array([f"{group}:{i}" for i in instance]))
        if held_emb:
            emb = np.concatenate(held_emb)
            cls = np.concatenate(held_class)
            inst = np.concatenate(held_instance)
            acc, nearest = nn_accuracy(emb, cls)
            family = ~np.char.startswith(inst, PROTEINS)
            embedding_reports.append(EmbeddingReport(
                snr=snr, n_particles=len(emb), nn_accuracy=acc,
                nn_accuracy_families=nn_accuracy(emb[family], cls[family])[0],
                five_shot_accuracy=few_shot_accuracy(emb, cls, seed=seed),
                instance_retrieval=float((inst[nearest] == inst)[family].mean())))
    return reports, embedding_reports


def summary(reports: list[GroupReport]) -> dict[str, float]:
    """Held-out groups averaged over SNRs: model r minus best-blur r, per group and overall."""
    out: dict[str, float] = {}
    for group in dict.fromkeys(r.group for r in reports if r.held_out):
        rows = [r for r in reports if r.group == group]
        out[group] = float(np.mean([r.model_r - r.blur_r for r in rows]))
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


def format_generalisation(reports: list[GroupReport], embeddings: list[EmbeddingReport]) -> str:
    lines = ["| group | held out | SNR | particles | model r | min | best blur r | sigma |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(reports, key=lambda r: (not r.held_out, r.group, -r.snr)):
        lines.append(f"| {r.group} | {'yes' if r.held_out else 'no'} | {r.snr:g} | "
                     f"{r.n_particles} | {r.model_r:.3f} | {r.model_r_min:.3f} | "
                     f"{r.blur_r:.3f} | {r.blur_sigma:g} |")
    lines += ["", "| SNR | held-out particles | 1-NN class acc | 1-NN family acc (families "
              "only) | 5-shot acc | instance retrieval |", "|---|---|---|---|---|---|"]
    for e in embeddings:
        lines.append(f"| {e.snr:g} | {e.n_particles} | {100 * e.nn_accuracy:.1f} % | "
                     f"{100 * e.nn_accuracy_families:.1f} % | "
                     f"{100 * e.five_shot_accuracy:.1f} % | {100 * e.instance_retrieval:.1f} % |")
    gaps = summary(reports)
    if gaps:
        lines += ["", "held-out model r - best blur r, mean over SNRs: "
                  + ", ".join(f"{k} {v:+.3f}" for k, v in gaps.items())]
    return "\n".join(lines)


def to_json(reports: list[GroupReport], embeddings: list[EmbeddingReport]) -> str:
    return json.dumps({"groups": [asdict(r) for r in reports],
                       "embeddings": [asdict(e) for e in embeddings],
                       "held_out_gap": summary(reports)}, indent=2)
