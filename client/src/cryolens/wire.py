"""The client's side of the wire: requests as data (path, query, body, headers) and answers
decoded into numpy arrays named as the contract's rows name them (:mod:`cryolens.contract`);
the server's error answers as exceptions. Plain functions of bytes and arrays:
:mod:`cryolens.plans` decides what to send, :mod:`cryolens.client` sends it."""
from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from cryolens import formats
from cryolens.contract import PER_VOLUME, Endpoint
from cryolens.errors import CryoLensError

#: Wait before the first retry when a 503 carries no (readable) ``Retry-After``; doubles.
FALLBACK_RETRY_WAIT_S = 0.5
#: Doublings of the fallback wait before it stops growing (``max_retry_wait_s`` caps it too).
_MAX_DOUBLINGS = 16
JSON_MEDIA_TYPE = "application/json"


class CryoLensHTTPError(CryoLensError):
    """The server answered with an error status.

    ``status``: the HTTP status; ``detail``: the server's message (a string, or the list of
    validation errors it sent); ``field``: the request field at fault, when the server named
    one; ``request_id``: the server's ``X-Request-ID`` (quote it when reading the server log);
    ``method`` and ``path``: the request.
    """

    def __init__(self, status: int, detail: Any, *, field: str | None = None,
                 request_id: str | None = None, method: str = "", path: str = "") -> None:
        self.status = status
        self.detail = detail
        self.field = field
        self.request_id = request_id
        self.method = method
        self.path = path
        super().__init__(self._message())

    @property
    def detail_text(self) -> str:
        """The server's message as text: validation errors (a list of ``{"loc", "msg"}``) as
        ``loc: msg; ...``."""
        if isinstance(self.detail, list):
            return "; ".join(
                f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
                if isinstance(e, dict) else str(e) for e in self.detail)
        return str(self.detail)

    def _message(self) -> str:
        where = f" from {self.method} {self.path}" if self.path else ""
        extra = [f"field {self.field!r}"] if self.field else []
        if self.request_id:
            extra.append(f"request id {self.request_id}")
        return f"HTTP {self.status}{where}: {self.detail_text}" + (
            f" ({', '.join(extra)})" if extra else "")


class CryoLensAnswerError(CryoLensError):
    """The server answered 2xx, but not to the request sent: another number of rows than
    volumes, or arrays of another shape than the answer's first request. ``request_id``: the
    server's ``X-Request-ID`` (None if it sent none); ``method`` and ``path``: the request."""

    def __init__(self, problem: str, *, request_id: str | None, method: str, path: str) -> None:
        self.problem = problem
        self.request_id = request_id
        self.method = method
        self.path = path
        rid = f"request id {request_id}" if request_id else "no request id"
        super().__init__(f"{method} {path} was answered wrongly ({rid}): {problem}")


class CryoLensConnectionError(CryoLensError):
    """The server could not be reached, or did not answer in time (``__cause__`` is httpx's
    exception)."""


# -- requests and responses as data ----------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    volumes: int = 0  # how many volumes the body holds (a 413 to several: send fewer)


def send_args(request: Request, body: Any) -> dict[str, Any]:
    """``httpx`` arguments for ``request``, its body given as ``body`` (a one-shot stream of
    it, :func:`once` or :func:`once_async`) with its length. httpx keeps each response in a
    reference cycle (the response's stream refers back to it) that only Python's cyclic garbage
    collector frees, and with it the request and its body: a stack's bodies, tens of MB each,
    would pile up between collections. A generator lets go of the body once it is sent, and
    :func:`detached` keeps the answer's body outside the cycle."""
    headers = dict(request.headers)
    if request.content is not None:
        headers["Content-Length"] = str(len(request.content))
    return {"method": request.method, "url": request.path, "params": request.params or None,
            "content": None if request.content is None else body, "headers": headers}


def once(body: bytes | None) -> Iterator[bytes]:
    if body:
        yield body


async def once_async(body: bytes | None) -> AsyncIterator[bytes]:
    if body:
        yield body


def detached(streamed: httpx.Response, raw: bytes) -> httpx.Response:
    """A response holding the body ``raw`` as it came (decoded here as httpx decodes any), not
    tied to the connection's stream, so that it is freed as soon as it is dropped."""
    return httpx.Response(streamed.status_code, headers=streamed.headers, content=raw,
                          request=streamed.request)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def npy_request(endpoint: Endpoint, volumes: np.ndarray, options: dict[str, Any]
                 ) -> Request:
    return Request("POST", endpoint.path,
                    params={k: _query_value(v) for k, v in options.items() if v is not None},
                    content=formats.write_npy(volumes),
                    headers={"Content-Type": formats.NPY_MEDIA_TYPE,
                             "Accept": formats.NPZ_MEDIA_TYPE},
                    volumes=_count(volumes))


def json_request(path: str, payload: dict[str, Any]) -> Request:
    return Request("POST", path, content=json.dumps(payload).encode(),
                    headers={"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE})


def volume_json_request(endpoint: Endpoint, volumes: np.ndarray, options: dict[str, Any]
                         ) -> Request:
    payload = {k: v for k, v in options.items() if v is not None}
    payload[endpoint.volumes] = volumes.tolist()
    return replace(json_request(endpoint.path, payload), volumes=_count(volumes))


def _count(volumes: np.ndarray) -> int:
    """How many volumes a request's array holds: a stack's length, or one."""
    return len(volumes) if volumes.ndim == 4 else 1


def _as_array(value: Any) -> np.ndarray:
    """A JSON value as numpy: float lists as float32 (the server's dtype), scalars 0-d."""
    array = np.asarray(value)
    if array.ndim and array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


def json_arrays(payload: dict[str, Any], endpoint: Endpoint) -> dict[str, np.ndarray]:
    """A JSON answer named as its .npz twin: the fields the seed nests (``segmented_outputs``,
    ``splats``) under their names in the endpoint's row."""
    return {k: _as_array(v) for k, v in endpoint.flat(payload).items()}


def _is_json(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == JSON_MEDIA_TYPE or kind.endswith("+json")


def decode(response: httpx.Response, endpoint: Endpoint) -> dict[str, np.ndarray]:
    """The arrays of a 2xx answer, .npz or JSON (an old server ignores ``Accept``), in the
    dtypes of a stack's .npz answer whatever the transport and however many volumes: a
    single volume's ``global_weight`` is a number (float64) in both, and JSON has no int8
    for ``segment``."""
    arrays = (json_arrays(response.json(), endpoint) if _is_json(response)
              else formats.read_npz(response.content))
    for key in PER_VOLUME & arrays.keys():
        if arrays[key].dtype == np.float64:
            arrays[key] = arrays[key].astype(np.float32)
    if "segment" in arrays and arrays["segment"].dtype.kind in "iu":
        arrays["segment"] = arrays["segment"].astype(np.int8)
    return arrays


def error_of(response: httpx.Response) -> CryoLensHTTPError:
    detail: Any = response.text or response.reason_phrase
    field_name = request_id = None
    if _is_json(response):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            detail = body.get("detail", detail)
            field_name = body.get("field") or _validation_field(detail)
            request_id = body.get("request_id")
    request_id = response.headers.get("x-request-id") or request_id
    request = response.request
    return CryoLensHTTPError(response.status_code, detail, field=field_name,
                             request_id=request_id, method=request.method,
                             path=request.url.path)


def _validation_field(detail: Any) -> str | None:
    """The option a validation error (a list of ``{"loc", "msg", "type"}``) is about: the
    first error's ``loc`` without where the option travelled (``query``, ``body``), as the
    client's keyword argument names it."""
    if not (isinstance(detail, list) and detail and isinstance(detail[0], dict)):
        return None
    loc = [str(part) for part in detail[0].get("loc") or ()]
    if len(loc) > 1 and loc[0] in ("query", "body", "path", "header"):
        loc = loc[1:]
    return loc[0] if loc else None


#: ``Retry-After`` as delay-seconds (RFC 9110: digits; a fraction is taken too).
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def retry_wait(response: httpx.Response, attempt: int, cap: float) -> float:
    """Seconds to wait before retrying a 503: its ``Retry-After`` (seconds or an HTTP date; a
    date in the past is 0), else an exponential fallback from :data:`FALLBACK_RETRY_WAIT_S`,
    as also for a value that is neither (``nan``, ``-1``, ``inf``, garbage); never more than
    ``cap``, never less than 0."""
    value = response.headers.get("retry-after", "").strip()
    wait: float | None = None
    if _DELAY_SECONDS.fullmatch(value):
        wait = float(value)  # a 400-digit number is inf: capped below
    elif value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            wait = when.timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            wait = None
    if wait is None or math.isnan(wait):
        wait = FALLBACK_RETRY_WAIT_S * 2 ** min(max(attempt, 0), _MAX_DOUBLINGS)
    return min(max(wait, 0.0), cap)
