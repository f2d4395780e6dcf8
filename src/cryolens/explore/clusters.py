"""Clusters of the embeddings, as a column of categories to colour and select by: k-means
(numpy, always) and HDBSCAN (scikit-learn, ``pip install 'cryolens-server[explore]'``)."""
from __future__ import annotations

import importlib.util

import numpy as np

from cryolens.errors import InputError

MAX_CLUSTERS = 100
#: k-means++ seeds are drawn from a sample of at most this many rows.
SEED_SAMPLE = 20_000
MAX_ITERATIONS = 50
#: k-means++ starts tried on the sample (the best goes on to all the rows).
RESTARTS = 8
BLOCK = 100_000
#: HDBSCAN's time grows faster than the rows; beyond this it would keep the page waiting.
MAX_HDBSCAN_ROWS = 200_000
NOISE = "noise"


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) int64 labels 0 .. k-1 of Lloyd's k-means (deterministic for a given ``seed``);
    labels are numbered by cluster size, largest first.

    :data:`RESTARTS` k-means++ starts run on a sample of at most :data:`SEED_SAMPLE` rows and
    the one of least inertia goes on to every row: one start alone can settle with two clusters
    merged and another split (four families of the explorer's test embeddings: 3 of 8 seeds
    found them, the others stopped at 1.6-2.0 times their inertia)."""
    n = len(embeddings)
    if not 2 <= k <= min(MAX_CLUSTERS, n):
        raise InputError(f"k must be a whole number from 2 to {min(MAX_CLUSTERS, n)}, not {k}",
                         field="k")
    rng = np.random.default_rng(seed)
    x = embeddings
    sample = x[rng.choice(n, min(n, SEED_SAMPLE), replace=False)].astype(np.float64)
    starts = [_lloyd(sample, _plus_plus(sample, k, rng)) for _ in range(RESTARTS)]
    best = min(starts, key=lambda start: start[2])[1]
    labels, _, _ = _lloyd(x, best)
    sizes = np.bincount(labels, minlength=k)
    rank = np.empty(k, np.int64)
    rank[np.lexsort((np.arange(k), -sizes))] = np.arange(k)
    return rank[labels]


def _lloyd(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's iterations from ``centres``: the labels, the centres and the inertia (the sum
    of squared distances of the rows to their centres)."""
    k = len(centres)
    centres = centres.astype(np.float64)
    labels = np.full(len(x), -1, np.int64)
    for _ in range(MAX_ITERATIONS):
        new = _assign(x, centres)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        for d in range(centres.shape[1]):
            sums = np.bincount(labels, weights=x[:, d], minlength=k)
            centres[:, d] = np.where(counts > 0, sums / np.maximum(counts, 1), centres[:, d])
    inertia = sum(float(((x[start:start + BLOCK] - centres[labels[start:start + BLOCK]]) ** 2)
                        .sum()) for start in range(0, len(x), BLOCK))
    return labels, centres, inertia


def _plus_plus(sample: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [sample[rng.integers(len(sample))]]
    closest = ((sample - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = closest.sum()
        pick = rng.choice(len(sample), p=closest / total) if total > 0 else \
            rng.integers(len(sample))
        centres.append(sample[pick])
        closest = np.minimum(closest, ((sample - sample[pick]) ** 2).sum(axis=1))
    return np.array(centres)


def _assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    c = centres.astype(np.float32)
    c2 = (c * c).sum(axis=1)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), BLOCK):
        block = x[start:start + BLOCK]
        out[start:start + BLOCK] = (c2 - 2.0 * (block @ c.T)).argmin(axis=1)
    return out


def hdbscan(embeddings: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """(N,) int64 labels of scikit-learn's HDBSCAN, -1 for noise."""
    n = len(embeddings)
    if importlib.util.find_spec("sklearn") is None:
        raise InputError("HDBSCAN needs scikit-learn: pip install 'cryolens-server[explore]'",
                         field="method")
    if n > MAX_HDBSCAN_ROWS:
        raise InputError(f"HDBSCAN over {n} rows would take too long here (at most "
                         f"{MAX_HDBSCAN_ROWS}); use k-means", field="method")
    if not 2 <= min_cluster_size <= n:
        raise InputError(f"min_cluster_size must be a whole number from 2 to {n}, not "
                         f"{min_cluster_size}", field="min_cluster_size")
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=min_cluster_size).fit_predict(embeddings).astype(np.int64)


def as_categories(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Labels as codes 0 .. C-1 and names ("1", "2", ..., then "noise" for -1)."""
    found = sorted(int(v) for v in np.unique(labels) if v >= 0)
    names = [str(v + 1) for v in found]
    lookup = {v: i for i, v in enumerate(found)}
    codes = np.array([lookup.get(int(v), len(found)) for v in range(labels.max() + 1)] or [0])
    out = np.where(labels >= 0, codes[np.maximum(labels, 0)], len(found))
    if (labels < 0).any():
        names.append(NOISE)
    return out.astype(np.int64), names


__all__ = ["MAX_CLUSTERS", "as_categories", "hdbscan", "kmeans"]
