"""Answers coming back, checked: an answer that does not fit its request refused; the answers
to a stack's requests gathered into one. (Volumes going out are checked once, as
:class:`~cryolens.checked.CheckedVolumes`.)"""
from __future__ import annotations

import httpx
import numpy as np

from cryolens.contract import COUNTS, ONE_VOLUME_NDIM, PER_VOLUME, SHARED
from cryolens.wire import CryoLensAnswerError


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


def check_rows(answer: dict[str, np.ndarray], volumes: int | None) -> None:
    """ValueError unless an answer's per-volume arrays fit the request: with ``volumes`` (a
    stack of that many was sent) each has that many rows, and ``n_volumes`` /
    ``num_processed`` say so; with None (one volume, no stack) each has the dimensions of
    one volume's answer (an ``embedding`` of one row, not two)."""
    for key in sorted(PER_VOLUME & answer.keys()):
        shape = answer[key].shape
        if volumes is None:
            want = ONE_VOLUME_NDIM.get(key)
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
