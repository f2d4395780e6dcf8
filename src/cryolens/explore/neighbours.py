"""Exact k nearest rows in embedding space, by Euclidean distance, with numpy.

One query costs a matrix-vector product over the table plus a partial sort: ~0.1 s at
1e6 x 40 on one core, so no index library is needed at the sizes the explorer serves.
"""
from __future__ import annotations

import numpy as np

from cryolens.errors import InputError

#: The most neighbours one query may ask for.
MAX_K = 1000
#: float32 rounding of |x|^2 - 2 x.q + |q|^2 stays below this many units in the last place
#: of |x|^2 + |q|^2 per dimension; candidates within that margin of the k-th are re-measured.
ROUNDING_ULPS = 4.0


class Neighbours:
    """Answers :meth:`query` over ``embeddings`` (N, k) float32; the squared norms are kept."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = embeddings
        self._squared: np.ndarray | None = None

    @property
    def squared(self) -> np.ndarray:
        if self._squared is None:  # computed on first use, not in the constructor
            self._squared = np.einsum("ij,ij->i", self.embeddings, self.embeddings)
        return self._squared

    def check_k(self, k: int) -> int:
        others = len(self.embeddings) - 1
        most = min(MAX_K, others)
        if not 1 <= k <= most:
            raise InputError(f"k must be a whole number from 1 to {most} (the table has "
                             f"{others} other rows; at most {MAX_K} a query), not {k}",
                             field="k")
        return k

    def query(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows nearest to ``row`` (itself excluded) and their distances, nearest
        first; equal distances in row order. Exact: the float32 shortcut only picks
        candidates, whose distances are then measured in float64."""
        k = self.check_k(k)
        x = self.embeddings
        q = x[row]
        approx = self.squared - 2.0 * (x @ q) + self.squared[row]
        approx[row] = np.inf
        at = np.argpartition(approx, k - 1)[k - 1]
        # each approximate distance is off by at most eps * (|x|^2 + |q|^2): a row may beat
        # the k-th when its value and the k-th's, both moved by that, could cross
        eps = np.finfo(np.float32).eps * ROUNDING_ULPS * x.shape[1]
        bound = approx[at] + eps * (self.squared[at] + self.squared[row])
        candidates = np.flatnonzero(approx - eps * (self.squared + self.squared[row]) <= bound)
        candidates = candidates[candidates != row]
        diff = x[candidates].astype(np.float64) - q.astype(np.float64)
        distances = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = np.lexsort((candidates, distances))[:k]
        return candidates[order], distances[order]


__all__ = ["MAX_K", "Neighbours"]
