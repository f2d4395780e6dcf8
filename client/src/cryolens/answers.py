"""Volumes going out and answers coming back, checked: a stack taken as given and refused
before sending if it holds NaN or infinity; an answer that does not fit its request refused;
the answers to a stack's requests gathered into one."""
from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from cryolens.errors import InputError
from cryolens.wire import COUNTS, PER_VOLUME, SHARED, CryoLensAnswerError


class Gathered:
    """The answers to a stack's requests, gathered into one as they come: each per-volume array
    is written into one array for every volume, allocated at the first answer, so the answers
    are never held twice (as a list of them and their concatenation). A stack answered in one
    request is kept as it came."""

    def __init__(self, total: int) -> None:
        self.total, self.filled = total, 0
        self.arrays: dict[str, np.ndarray] = {}  # per-volume fields, filled in place
        self.others: dict[str, list[np.ndarray]] = {}  # the rest, one entry per answer
        self.counts: list[int] = []

    def add(self, chunk: dict[str, np.ndarray], n: int) -> None:
        """Add one request's answer for ``n`` volumes; ValueError saying what does not fit
        (nothing is added then)."""
        if self.counts:
            missing = sorted((self.arrays.keys() | self.others.keys()) - chunk.keys())
            if missing:
                raise ValueError(f"the answer lacks {', '.join(missing)}, which the answers "
                                 "before it held")
            for key, array in self.arrays.items():
                if chunk[key].shape != (n, *array.shape[1:]):
                    raise ValueError(f"{key} has shape {chunk[key].shape}, expected "
                                     f"{(n, *array.shape[1:])}")
        if not self.counts:
            for key, value in chunk.items():
                if key in PER_VOLUME and value.ndim and n < self.total:
                    self.arrays[key] = np.empty((self.total, *value.shape[1:]), value.dtype)
                else:
                    self.others[key] = []
        for key, array in self.arrays.items():
            array[self.filled:self.filled + n] = chunk[key]
        for key, values in self.others.items():
            values.append(chunk[key])
        self.filled += n
        self.counts.append(n)

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.arrays)
        for key, values in self.others.items():
            per_volume = len(values) > 1 and key not in SHARED and all(  # a newer field
                v.ndim and v.shape[0] == n for v, n in zip(values, self.counts, strict=True))
            out[key] = np.concatenate(values) if per_volume else values[0]
        for key in COUNTS & out.keys():
            out[key] = np.asarray(self.total)
        if "reconstruction" in out:
            out["reconstruction_shape"] = np.asarray(out["reconstruction"].shape)
        return out


def with_leading_axis(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A single-volume answer in the shape of a one-volume stack."""
    return {k: (v[None] if k in PER_VOLUME else v) for k, v in result.items()}


def first_volume(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: (np.asarray(v[0]) if k in PER_VOLUME and v.ndim else v)
           for k, v in result.items()}
    if "reconstruction" in out:
        out["reconstruction_shape"] = np.asarray(out["reconstruction"].shape)
    return out


def volume_stack(volumes: Any) -> tuple[np.ndarray, bool]:
    """((N, D, H, W) as given, was a stack given). Not converted here: a float64 stack, a
    strided view or a memmap is turned into float32 a request at a time (:func:`float32`),
    never copied whole."""
    array = np.asarray(volumes)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"volumes must be real numbers, got dtype {array.dtype}")
    if array.ndim not in (3, 4):
        raise InputError(f"volumes must be one volume (D, H, W) or a stack (N, D, H, W), "
                         f"got shape {array.shape}", field="volumes")
    if array.ndim == 4 and array.shape[0] == 0:
        raise InputError("volumes is an empty stack", field="volumes")
    stacked = array.ndim == 4
    return (array if stacked else array[None]), stacked


def float32(part: np.ndarray) -> np.ndarray:
    """The volumes of one request as the server reads them: C-contiguous float32."""
    return np.ascontiguousarray(part, dtype=np.float32)


def check_finite(stack: np.ndarray, step: int) -> None:
    """Refuse NaN, infinity or values beyond float32's range before anything is sent (as JSON
    a NaN would be refused as malformed, saying nothing of where it is; and a bad volume late
    in a stack would waste the work of every request before it). Checked ``step`` volumes at
    a time: never a float32 copy of the whole stack."""
    if stack.dtype.kind != "f":
        return
    bad: list[int] = []
    for start in range(0, len(stack), step):
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, refused below
            part = np.asarray(stack[start:start + step], dtype=np.float32)
        finite = np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        bad += (np.flatnonzero(~finite) + start).tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise InputError(f"volumes must be finite: volume(s) [{shown}] hold NaN or infinity "
                         "(or a value beyond float32 range); nothing was sent", field="volumes")


#: Dimensions of each per-volume field in the answer to one volume sent without a stack.
_ONE_VOLUME_NDIM = {
    "reconstruction": 3, "affinity_reconstruction": 3, "free_reconstruction": 3,
    "embedding": 1, "embeddings": 1, "log_variance": 1, "pose": 1, "pose_axis_angle": 1,
    "global_weight": 0, "centers": 2, "weights": 1, "scales": 1,
}


def check_rows(answer: dict[str, np.ndarray], volumes: int | None) -> None:
    """ValueError unless an answer's per-volume arrays fit the request: with ``volumes`` (a
    stack of that many was sent) each has that many rows, and ``n_volumes`` /
    ``num_processed`` say so; with None (one volume, no stack) each has the dimensions of
    one volume's answer (an ``embedding`` of one row, not two)."""
    for key in sorted(PER_VOLUME & answer.keys()):
        shape = answer[key].shape
        if volumes is None:
            want = _ONE_VOLUME_NDIM.get(key)
            if want is not None and len(shape) != want:
                raise ValueError(f"{key} has shape {shape} for one volume; expected "
                                 f"{want} dimension(s)")
        elif not shape or shape[0] != volumes:
            raise ValueError(f"{key} has {shape[0] if shape else 'no'} row(s) for {volumes} "
                             f"volume(s) sent (shape {shape})")
    for key in sorted(COUNTS & answer.keys()):
        count = answer[key]
        if volumes is not None and (count.shape or int(count) != volumes):
            raise ValueError(f"{key} is {count.tolist()} for {volumes} volume(s) sent")


def answer_error(response: httpx.Response, problem: str) -> CryoLensAnswerError:
    request = response.request
    return CryoLensAnswerError(problem, request_id=response.headers.get("x-request-id"),
                               method=request.method, path=request.url.path)
