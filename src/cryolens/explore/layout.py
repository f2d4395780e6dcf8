"""2-D layouts of the embeddings for the map: PCA (instant, always), UMAP or PaCMAP (when
umap-learn or pacmap is installed: ``pip install 'cryolens-server[explore]'``).

A UMAP or PaCMAP layout is computed once and cached beside the table as
``TABLE.parquet.<method>.npz``, kept while the table's size and modification time are those it
was made from; a folder that cannot be written only loses the cache.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from cryolens.errors import InputError

log = logging.getLogger(__name__)

METHODS = ("pca", "umap", "pacmap")
#: The Python module each method needs.
MODULES = {"umap": "umap", "pacmap": "pacmap"}
INSTALL = "pip install 'cryolens-server[explore]'"
#: Rows per block of the PCA's projection: bounds its temporaries (~16 MB at 40 dims).
BLOCK = 100_000
#: PCA axes of a bigger table come from this many of its rows, drawn at random (seeded).
PCA_SAMPLE = 50_000
#: Bumped when a method's settings change, so that older caches are not reused.
CACHE_VERSION = 1


def available() -> dict[str, bool]:
    """Which methods can run here."""
    return {m: m == "pca" or importlib.util.find_spec(MODULES[m]) is not None for m in METHODS}


def pca(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components (N, 2) float32 and the fraction of the variance each
    explains. The axes come from the covariance (float64) of all rows, or of a fixed random
    sample of ``PCA_SAMPLE`` rows of a bigger table (the axes of a 2-D map do not change with
    more), so a million rows take about a second; each axis's sign is fixed (its largest
    loading positive) so the map is stable."""
    n = len(embeddings)
    rows = embeddings
    if n > PCA_SAMPLE:
        rows = embeddings[np.sort(np.random.default_rng(0).choice(n, PCA_SAMPLE, replace=False))]
    centred = rows.astype(np.float64) - rows.mean(axis=0, dtype=np.float64)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:2]
    axes = vectors[:, order]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])])
    mean = embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)
    coords = np.zeros((n, 2), np.float32)
    for start in range(0, n, BLOCK):
        coords[start:start + BLOCK, :axes.shape[1]] = \
            (embeddings[start:start + BLOCK] - mean) @ axes.astype(np.float32)
    total = values.sum()
    explained = values[order] / total if total > 0 else np.zeros(len(order))
    return coords, np.pad(explained, (0, 2 - len(explained)))


def normalised(coords: np.ndarray) -> np.ndarray:
    """``coords`` moved and scaled alike on both axes into [-1, 1] (the longer axis spans
    [-0.95, 0.95]), as float32: the coordinates the WebGL map draws."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    half = float((hi - lo).max()) / 2
    scale = 0.95 / half if half > 0 else 1.0
    return ((coords - (lo + hi) / 2) * scale).astype(np.float32)


def _umap(embeddings: np.ndarray) -> np.ndarray:
    import umap

    neighbours = max(2, min(15, len(embeddings) - 1))
    # a fixed random_state makes UMAP run on one thread (n_jobs 1): the same map every time
    return umap.UMAP(n_neighbors=neighbours, random_state=0, n_jobs=1,
                     low_memory=True).fit_transform(embeddings)


def _pacmap(embeddings: np.ndarray) -> np.ndarray:
    import pacmap

    return pacmap.PaCMAP(n_components=2, random_state=0).fit_transform(embeddings)


class Layouts:
    """The layouts of one table, each computed at most once (and UMAP/PaCMAP cached on disk)."""

    def __init__(self, table_path: Path, embeddings: np.ndarray) -> None:
        self.table_path, self.embeddings = Path(table_path), embeddings
        self._done: dict[str, tuple[np.ndarray, dict]] = {}
        self._lock = threading.Lock()

    def cache_path(self, method: str) -> Path:
        return self.table_path.with_name(f"{self.table_path.name}.{method}.npz")

    def get(self, method: str) -> tuple[np.ndarray, dict]:
        """(N, 2) float32 in [-1, 1] and what it is: ``method``, ``seconds`` to compute,
        ``cached`` (read from the cache file), ``explained`` (PCA's variance fractions)."""
        if method not in METHODS:
            raise InputError(f"layout must be one of {', '.join(METHODS)}, not {method!r}",
                             field="method")
        if not available()[method]:
            raise InputError(f"the {method} layout needs the {MODULES[method]} package: "
                             f"{INSTALL}", field="method")
        with self._lock:  # one computation at a time; a second asker waits for the first
            if method not in self._done:
                self._done[method] = self._compute(method)
            return self._done[method]

    def _compute(self, method: str) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        if method == "pca":
            coords, explained = pca(self.embeddings)
            info = {"explained": [float(v) for v in explained]}
        else:
            cached = self._read_cache(method)
            if cached is not None:
                return cached, {"method": method, "cached": True,
                                "seconds": time.perf_counter() - started}
            coords = (_umap if method == "umap" else _pacmap)(self.embeddings)
            info = {}
        coords = normalised(np.asarray(coords, np.float64))
        if method != "pca":
            self._write_cache(method, coords)
        return coords, {"method": method, "cached": False,
                        "seconds": time.perf_counter() - started, **info}

    def _fingerprint(self, method: str) -> np.ndarray:
        stat = self.table_path.stat()
        return np.array([CACHE_VERSION, stat.st_size, stat.st_mtime_ns, *self.embeddings.shape,
                         METHODS.index(method)], np.int64)

    def _read_cache(self, method: str) -> np.ndarray | None:
        path = self.cache_path(method)
        try:
            with np.load(path) as saved:
                if np.array_equal(saved["fingerprint"], self._fingerprint(method)):
                    return saved["coords"].astype(np.float32)
        except (OSError, KeyError, ValueError):
            return None
        return None

    def _write_cache(self, method: str, coords: np.ndarray) -> None:
        path = self.cache_path(method)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            np.savez(tmp, coords=coords, fingerprint=self._fingerprint(method))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot cache the %s layout at %s (%s); it is computed again next time",
                        method, path, exc)
            tmp.unlink(missing_ok=True)


__all__ = ["METHODS", "Layouts", "available", "normalised", "pca"]
