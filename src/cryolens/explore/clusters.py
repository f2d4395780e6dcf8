"""Clusters of the embeddings, as a column of categories to colour and select by: scikit-learn's
k-means and HDBSCAN, with the explorer's limits and its numbering of the clusters."""
from __future__ import annotations

import warnings

import numpy as np

from cryolens.errors import InputError

MAX_CLUSTERS = 100
#: k-means++ seeds are drawn from a sample of at most this many rows.
SEED_SAMPLE = 20_000
MAX_ITERATIONS = 50
#: k-means++ starts tried on the sample (the best goes on to all the rows).
RESTARTS = 8
#: HDBSCAN's time grows faster than the rows; beyond this it would keep the page waiting.
MAX_HDBSCAN_ROWS = 200_000
NOISE = "noise"


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) int64 labels 0 .. k-1 of scikit-learn's k-means (deterministic for a given
    ``seed``); labels are numbered by cluster size, largest first.

    :data:`RESTARTS` k-means++ starts run on a sample of at most :data:`SEED_SAMPLE` rows and
    the best goes on to every row: one start alone can settle with two clusters merged and
    another split, and eight over a million rows would take eight times as long."""
    n = len(embeddings)
    if not 2 <= k <= min(MAX_CLUSTERS, n):
        raise InputError(f"k must be a whole number from 2 to {min(MAX_CLUSTERS, n)}, not {k}",
                         field="k")
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(seed)
    sample = embeddings[np.sort(rng.choice(n, min(n, SEED_SAMPLE), replace=False))]
    with warnings.catch_warnings():  # fewer distinct rows than k: some clusters stay empty
        warnings.simplefilter("ignore", ConvergenceWarning)
        seeded = KMeans(k, n_init=RESTARTS, max_iter=MAX_ITERATIONS, random_state=seed)
        centres = seeded.fit(sample).cluster_centers_
        labels = KMeans(k, init=centres, n_init=1, max_iter=MAX_ITERATIONS).fit_predict(
            embeddings)
    sizes = np.bincount(labels, minlength=k)
    rank = np.empty(k, np.int64)
    rank[np.lexsort((np.arange(k), -sizes))] = np.arange(k)
    return rank[labels]


def hdbscan(embeddings: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """(N,) int64 labels of scikit-learn's HDBSCAN, -1 for noise."""
    n = len(embeddings)
    if n > MAX_HDBSCAN_ROWS:
        raise InputError(f"HDBSCAN over {n} rows would take too long here (at most "
                         f"{MAX_HDBSCAN_ROWS}); use k-means", field="method")
    if not 2 <= min_cluster_size <= n:
        raise InputError(f"min_cluster_size must be a whole number from 2 to {n}, not "
                         f"{min_cluster_size}", field="min_cluster_size")
    from sklearn.cluster import HDBSCAN

    found = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(embeddings)
    return found.astype(np.int64)


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
