"""Volumes checked once where they cross a trust boundary: a stack of real, finite numbers.

A :class:`CheckedVolumes` can only be made by checking (or by joining checked ones), so code
that receives one may skip the check: the client checks before sending, the server on
receiving, and the engine trusts the server's; anything else given to the engine is checked
there (the engine used as a library still refuses NaN).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cryolens.errors import InputError

#: Volumes converted to float32 at a time while checking: never a float32 copy of a whole
#: float64 stack or memmap.
CHECK_STEP = 32


class CheckedVolumes:
    """``array``: (N, D, H, W) real numbers, each finite in float32, as given (not copied or
    converted: a float64 memmap stays one); ``stacked``: the caller gave a stack, not one
    volume. Made by :meth:`check`, :meth:`from_checked` or :meth:`join`."""

    __slots__ = ("array", "stacked")

    def __init__(self, array: np.ndarray, stacked: bool, _token: object = None) -> None:
        if _token is not _MADE_HERE:
            raise TypeError("CheckedVolumes are made by CheckedVolumes.check(volumes)")
        self.array = array
        self.stacked = stacked

    @classmethod
    def check(cls, volumes, *, field: str = "volumes", step: int = CHECK_STEP,
              after: str = "") -> CheckedVolumes:
        """Check ``volumes`` (one (D, H, W) volume or an (N, D, H, W) stack): real numbers,
        none NaN, infinite or beyond float32's range. An :class:`InputError` names ``field``
        and the volumes at fault (``after``: words added to its message)."""
        if isinstance(volumes, CheckedVolumes):
            return volumes
        array = np.asarray(volumes)
        if array.dtype.kind not in "fiub":
            raise InputError(f"{field} must be real numbers, got dtype {array.dtype}",
                             field=field)
        if array.ndim not in (3, 4):
            raise InputError(f"{field} must be one volume (D, H, W) or a stack (N, D, H, W), "
                             f"got shape {array.shape}", field=field)
        stacked = array.ndim == 4
        stack = array if stacked else array[None]
        if len(stack) == 0:
            raise InputError(f"{field} is an empty stack: expected at least one volume",
                             field=field)
        bad = not_finite(stack, step)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise InputError(f"{field} must be finite: volume(s) [{shown}] hold NaN or infinity "
                             f"(or a value beyond float32 range, |x| > 3.4e38){after}",
                             field=field)
        return cls(stack, stacked, _MADE_HERE)

    @classmethod
    def from_checked(cls, array: np.ndarray, stacked: bool) -> CheckedVolumes:
        """(N, D, H, W) float32 whose every value the caller has just checked itself (the
        server's JSON reader refuses each number not finite in float32 as it parses; the
        napari plugin keeps only the boxes :func:`not_finite` passed): no second pass."""
        if array.ndim != 4 or array.dtype != np.float32:
            raise TypeError(f"checked volumes are (N, D, H, W) float32, got {array.dtype} "
                            f"{array.shape}")
        return cls(array, stacked, _MADE_HERE)

    @classmethod
    def join(cls, parts: Sequence[CheckedVolumes]) -> CheckedVolumes:
        """One stack of several checked ones (the server batching requests): not checked
        again."""
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.array for p in parts]), True, _MADE_HERE)

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.array, dtype)

    def float32(self) -> np.ndarray:
        """The volumes as C-contiguous float32 (no copy when they are already)."""
        return float32(self.array)

    def __repr__(self) -> str:
        return f"CheckedVolumes({self.array.dtype} {self.array.shape}, stacked={self.stacked})"


def float32(array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous float32 (no copy when it is one already): a request's
    volumes as the client sends them, and a chunk as the engine computes on it."""
    return np.ascontiguousarray(array, dtype=np.float32)


def not_finite(stack: np.ndarray, step: int = CHECK_STEP) -> list[int]:
    """Indices of the volumes of ``stack`` that hold NaN, infinity or a value beyond float32's
    range; ``step`` volumes are converted to float32 at a time. Integers are always finite."""
    if stack.dtype.kind != "f":
        return []
    bad: list[int] = []
    for start in range(0, len(stack), step):
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, refused
            part = np.asarray(stack[start:start + step], dtype=np.float32)
        finite = np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        bad += (np.flatnonzero(~finite) + start).tolist()
    return bad


_MADE_HERE = object()

__all__ = ["CHECK_STEP", "CheckedVolumes", "float32", "not_finite"]
