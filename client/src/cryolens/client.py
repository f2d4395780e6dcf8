"""A Python client for the CryoLens REST server: numpy in, numpy out.

Needs only numpy and httpx (tqdm for ``progress=True``), never PyTorch::

    from cryolens.client import CryoLensClient

    with CryoLensClient("http://localhost:8023") as client:
        features = client.extract_features(particles)   # (N, 48, 48, 48) float32
        features["embedding"]                           # (N, latent_dims)

One method per endpoint, named after it. The model endpoints take one volume ``(D, H, W)`` or
a stack ``(N, D, H, W)`` and return a dict of numpy arrays named like the server's response
fields (for ``.npz`` naming: ``segmented_outputs`` become ``affinity_reconstruction`` and
``free_reconstruction``, splat fields sit at the top level), with a leading ``N`` on every
per-volume array when a stack was given.

Transfer is binary by default: the volumes go out as one ``.npy`` body (options as query
parameters) and the answer comes back as ``.npz`` (``Accept: application/x-npz``). A server
that does not read ``.npy`` (it answers 415) is spoken to in JSON from then on, one volume per
request (the JSON contract is single-volume except for ``/batch_process``); ``binary=False``
asks for JSON from the start. Stacks larger than ``batch_size`` are sent in several requests,
each answer written into one array per field for the whole stack as it comes, so a stack's
answers are held once (no request's body or answer outlives it). A 503 (queue full, model
loading) is retried after the server's
``Retry-After`` (at most ``max_retries`` times, each wait capped at ``max_retry_wait_s``); a 413
to several volumes halves ``batch_size`` (a ``RuntimeWarning`` says so) and sends them again; any
other error status raises :class:`CryoLensHTTPError` with the server's message, field, status and
request id. An answer that does not fit its request (another number of rows than volumes sent)
raises :class:`CryoLensAnswerError` with the request id, never a result. Volumes that are not one volume or a stack, or that hold NaN or infinity, are an
:class:`~cryolens.errors.InputError` before anything is sent.

The request building and response decoding below are plain functions of bytes and arrays;
:class:`CryoLensClient` and :class:`AsyncCryoLensClient` only differ in how they send.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import math
import numbers
import re
import time
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from cryolens import __version__, formats
from cryolens.errors import CryoLensError, InputError

DEFAULT_URL = "http://localhost:8023"
#: Seconds to wait for a TCP connection to the server.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for an answer (a large batch on a CPU takes a while).
READ_TIMEOUT_S = 300.0
#: Volumes sent per request: 64 float32 48^3 volumes are 28 MiB of .npy.
DEFAULT_BATCH_SIZE = 64
#: Retries of a request answered 503 (so at most ``1 + DEFAULT_MAX_RETRIES`` tries).
DEFAULT_MAX_RETRIES = 5
#: Longest wait before a retry, whatever ``Retry-After`` says.
MAX_RETRY_WAIT_S = 30.0
#: Wait before the first retry when a 503 carries no (readable) ``Retry-After``; doubles.
FALLBACK_RETRY_WAIT_S = 0.5
#: Doublings of the fallback wait before it stops growing (``max_retry_wait_s`` caps it too).
_MAX_DOUBLINGS = 16
JSON_MEDIA_TYPE = "application/json"
USER_AGENT = f"cryolens-client/{__version__}"

#: Response fields that hold one entry per volume (concatenated across requests).
PER_VOLUME = frozenset({
    "reconstruction", "reconstructions", "affinity_reconstruction", "free_reconstruction",
    "embedding", "embeddings", "log_variance", "pose", "poses", "pose_axis_angle",
    "global_weight", "global_weights", "centers", "weights", "scales",
})
#: Fields that count the volumes (set to the total after concatenation).
COUNTS = frozenset({"n_volumes", "num_processed"})
#: Fields that describe the request or the model, the same in every request's answer.
SHARED = frozenset({"input_shape", "reconstruction_shape", "voxel_size", "segment", "n_affinity",
                    "n_free", "n_total", "latent_dims"}) | COUNTS


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
class _Request:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    volumes: int = 0  # how many volumes the body holds (a 413 to several: send fewer)


@dataclass(frozen=True)
class _Endpoint:
    path: str
    json_field: str
    batch: bool  # the JSON body takes a list of volumes (/batch_process)


_RECONSTRUCT = _Endpoint("/reconstruct", "input_volume", False)
_FEATURES = _Endpoint("/extract_features", "input_volume", False)
_SPLATS = _Endpoint("/extract_gaussian_splats", "input_volume", False)
_BATCH = _Endpoint("/batch_process", "input_volumes", True)


def _send_args(request: _Request, body: Any) -> dict[str, Any]:
    """``httpx`` arguments for ``request``, its body given as ``body`` (a one-shot stream of
    it, :func:`_once` or :func:`_once_async`) with its length. httpx keeps each response in a
    reference cycle (the response's stream refers back to it) that only Python's cyclic garbage
    collector frees, and with it the request and its body: a stack's bodies, tens of MB each,
    would pile up between collections. A generator lets go of the body once it is sent, and
    :func:`_detached` keeps the answer's body outside the cycle."""
    headers = dict(request.headers)
    if request.content is not None:
        headers["Content-Length"] = str(len(request.content))
    return {"method": request.method, "url": request.path, "params": request.params or None,
            "content": None if request.content is None else body, "headers": headers}


def _once(body: bytes | None) -> Iterator[bytes]:
    if body:
        yield body


async def _once_async(body: bytes | None) -> AsyncIterator[bytes]:
    if body:
        yield body


def _detached(streamed: httpx.Response, raw: bytes) -> httpx.Response:
    """A response holding the body ``raw`` as it came (decoded here as httpx decodes any), not
    tied to the connection's stream, so that it is freed as soon as it is dropped."""
    return httpx.Response(streamed.status_code, headers=streamed.headers, content=raw,
                          request=streamed.request)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _npy_request(endpoint: _Endpoint, volumes: np.ndarray, options: dict[str, Any]
                 ) -> _Request:
    return _Request("POST", endpoint.path,
                    params={k: _query_value(v) for k, v in options.items() if v is not None},
                    content=formats.write_npy(volumes),
                    headers={"Content-Type": formats.NPY_MEDIA_TYPE,
                             "Accept": formats.NPZ_MEDIA_TYPE},
                    volumes=_count(volumes))


def _json_request(path: str, payload: dict[str, Any]) -> _Request:
    return _Request("POST", path, content=json.dumps(payload).encode(),
                    headers={"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE})


def _volume_json_request(endpoint: _Endpoint, volumes: np.ndarray, options: dict[str, Any]
                         ) -> _Request:
    payload = {k: v for k, v in options.items() if v is not None}
    payload[endpoint.json_field] = volumes.tolist()
    return replace(_json_request(endpoint.path, payload), volumes=_count(volumes))


def _count(volumes: np.ndarray) -> int:
    """How many volumes a request's array holds: a stack's length, or one."""
    return len(volumes) if volumes.ndim == 4 else 1


def _as_array(value: Any) -> np.ndarray:
    """A JSON value as numpy: float lists as float32 (the server's dtype), scalars 0-d."""
    array = np.asarray(value)
    if array.ndim and array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


def _json_arrays(payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """A JSON answer named as its .npz twin: ``segmented_outputs`` -> ``affinity_reconstruction``
    and ``free_reconstruction``, other objects (``splats``) flattened to the top level."""
    out: dict[str, np.ndarray] = {}
    for key, value in payload.items():
        if value is None:
            continue
        if key == "segmented_outputs" and isinstance(value, dict):
            out.update({f"{name}_reconstruction": _as_array(v) for name, v in value.items()})
        elif isinstance(value, dict):
            out.update({k: _as_array(v) for k, v in value.items() if v is not None})
        else:
            out[key] = _as_array(value)
    return out


def _is_json(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == JSON_MEDIA_TYPE or kind.endswith("+json")


def _decode(response: httpx.Response) -> dict[str, np.ndarray]:
    """The arrays of a 2xx answer, .npz or JSON (an old server ignores ``Accept``), in the
    dtypes of a stack's .npz answer whatever the transport and however many volumes: a
    single volume's ``global_weight`` is a number (float64) in both, and JSON has no int8
    for ``segment``."""
    arrays = (_json_arrays(response.json()) if _is_json(response)
              else formats.read_npz(response.content))
    for key in PER_VOLUME & arrays.keys():
        if arrays[key].dtype == np.float64:
            arrays[key] = arrays[key].astype(np.float32)
    if "segment" in arrays and arrays["segment"].dtype.kind in "iu":
        arrays["segment"] = arrays["segment"].astype(np.int8)
    return arrays


def _error(response: httpx.Response) -> CryoLensHTTPError:
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


class _Gathered:
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


def _with_leading_axis(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A single-volume answer in the shape of a one-volume stack."""
    return {k: (v[None] if k in PER_VOLUME else v) for k, v in result.items()}


def _first_volume(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: (np.asarray(v[0]) if k in PER_VOLUME and v.ndim else v)
           for k, v in result.items()}
    if "reconstruction" in out:
        out["reconstruction_shape"] = np.asarray(out["reconstruction"].shape)
    return out


def _volumes(volumes: Any) -> tuple[np.ndarray, bool]:
    """((N, D, H, W) as given, was a stack given). Not converted here: a float64 stack, a
    strided view or a memmap is turned into float32 a request at a time (:func:`_float32`),
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


def _float32(part: np.ndarray) -> np.ndarray:
    """The volumes of one request as the server reads them: C-contiguous float32."""
    return np.ascontiguousarray(part, dtype=np.float32)


def _check_finite(stack: np.ndarray, step: int) -> None:
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


def _server_url(url: str) -> str:
    """``url`` without a trailing slash, checked now: httpx would first complain of a missing
    scheme (``localhost:8023`` reads as scheme ``localhost``) at the first request."""
    try:
        parsed = httpx.URL(str(url))
    except httpx.InvalidURL as exc:
        raise InputError(f"url {url!r} is not a valid URL: {exc}", field="url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InputError(f"url must be the server's http:// or https:// address, such as "
                         f"{DEFAULT_URL}; got {url!r}", field="url")
    return str(url).rstrip("/")


_Plan = Generator[_Request, httpx.Response, Any]


class _Core:
    """Settings and the request plans shared by the sync and async clients. A plan is a
    generator that yields requests, is sent their (2xx or 415) responses and returns the
    result; the clients drive it and handle retries."""

    def __init__(self, url: str = DEFAULT_URL, *, binary: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_retry_wait_s: float = MAX_RETRY_WAIT_S,
                 headers: dict[str, str] | None = None) -> None:
        if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1):
            raise InputError(f"batch_size must be a whole number of volumes, at least 1, got "
                             f"{batch_size!r}", field="batch_size")
        self.url = _server_url(url)
        self.binary = binary
        self.batch_size = int(batch_size)
        self.progress = progress
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._http_options: dict[str, Any] = {
            "base_url": self.url,
            "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
            "headers": {"User-Agent": USER_AGENT, **(headers or {})},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, binary={self.binary})"

    # -- plans ---------------------------------------------------------------------------
    def _get_plan(self, path: str) -> _Plan:
        response = yield _Request("GET", path, headers={"Accept": JSON_MEDIA_TYPE})
        return response.json()

    def _statistics_plan(self, volume: Any) -> _Plan:
        array = np.asarray(volume)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError("volume must be finite: it holds NaN or infinity", field="volume")
        if self.binary:
            response = yield _Request("POST", "/statistics", content=formats.write_npy(array),
                                      headers={"Content-Type": formats.NPY_MEDIA_TYPE})
            if response.status_code != 415:
                return _json_arrays(response.json())
            self.binary = False
        response = yield _json_request("/statistics", {"volume": array.tolist()})
        return _json_arrays(response.json())

    def _volumes_plan(self, endpoint: _Endpoint, volumes: Any, options: dict[str, Any],
                      progress: bool | None) -> _Plan:
        stack, stacked = _volumes(volumes)
        _check_finite(stack, self.batch_size)
        total = len(stack)
        bar = self._bar(endpoint.path, total, progress if progress is not None
                        else self.progress)
        gathered = _Gathered(total)
        try:
            start = 0
            while start < total:
                if self.binary:
                    part = _float32(stack[start:start + self.batch_size])
                    sent = part if (stacked or endpoint.batch) else part[0]
                    response = yield _npy_request(endpoint, sent, options)
                    if response.status_code == 415:  # an old server: JSON from now on
                        self.binary = False
                        continue
                else:
                    part = _float32(stack[start:start + (self.batch_size if endpoint.batch
                                                         else 1)])
                    # the JSON contract: one volume per request, except /batch_process
                    sent = part if endpoint.batch else part[0]
                    response = yield _volume_json_request(endpoint, sent, options)
                if response.status_code == 413:  # more than the server takes: send fewer
                    self._fewer_volumes(len(part), response)
                    continue
                result = _decode(response)
                try:
                    check_rows(result, len(part) if sent.ndim == 4 else None)
                    if stacked or endpoint.batch:
                        gathered.add(result if sent.ndim == 4 else _with_leading_axis(result),
                                     len(part))
                except ValueError as exc:
                    raise _answer_error(response, str(exc)) from None
                if bar is not None:
                    bar.update(len(part))
                if not stacked and not endpoint.batch:
                    return result  # one volume, answered as one
                start += len(part)
        finally:
            if bar is not None:
                bar.close()
        merged = gathered.result()
        if not stacked:  # one volume sent to /batch_process: answered without the leading N
            return _first_volume(merged)
        if "input_shape" in merged and not endpoint.batch:
            merged["input_shape"] = np.asarray(stack.shape)
        return merged

    def _fewer_volumes(self, sent: int, response: httpx.Response) -> None:
        """A server that refused ``sent`` volumes in one request (413: its ``--max-volumes``
        or body limit is below this client's ``batch_size``) gets half as many a request from
        now on, which the caller is told once per halving."""
        self.batch_size = max(1, sent // 2)
        warnings.warn(f"{self.url} refused {sent} volumes in one request "
                      f"({_error(response).detail_text}); sending {self.batch_size} a request "
                      "from now on (the client's batch_size)", RuntimeWarning, stacklevel=5)

    @staticmethod
    def _bar(path: str, total: int, wanted: bool):
        if not wanted:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
        return tqdm(total=total, unit="vol", desc=path.strip("/"))

    # -- the endpoints, as plans -----------------------------------------------------------
    def _reconstruct(self, volumes, use_segmented_decoder, use_final_convolution,
                     return_splat_data, return_embeddings, use_predicted_pose, progress):
        return self._volumes_plan(_RECONSTRUCT, volumes, {
            "use_segmented_decoder": use_segmented_decoder,
            "use_final_convolution": use_final_convolution,
            "return_splat_data": return_splat_data, "return_embeddings": return_embeddings,
            "use_predicted_pose": use_predicted_pose}, progress)

    def _extract_features(self, volumes, return_pose, return_global_weight, return_variance,
                          progress):
        return self._volumes_plan(_FEATURES, volumes, {
            "return_pose": return_pose, "return_global_weight": return_global_weight,
            "return_variance": return_variance}, progress)

    def _extract_gaussian_splats(self, volumes, include_free_segment, progress):
        return self._volumes_plan(_SPLATS, volumes,
                                  {"include_free_segment": include_free_segment}, progress)

    def _batch_process(self, volumes, options, progress):
        return self._volumes_plan(_BATCH, volumes, options, progress)

    # -- sending -------------------------------------------------------------------------------
    def _connection_error(self, request: _Request, exc: httpx.TransportError
                          ) -> CryoLensConnectionError:
        """httpx's error, saying which of the client's timeouts ran out, and what to change."""
        where = f"{request.method} {self.url}{request.path}"
        if isinstance(exc, httpx.ConnectTimeout):
            return CryoLensConnectionError(
                f"{where}: no connection within connect_timeout={self.connect_timeout} s: is "
                "the server running, and is this its address?")
        if isinstance(exc, httpx.TimeoutException):
            return CryoLensConnectionError(
                f"{where}: no answer within read_timeout={self.read_timeout} s: a large "
                "stack on a busy or CPU-only server can take longer; raise read_timeout, or "
                "send fewer volumes a request (batch_size)")
        return CryoLensConnectionError(f"{where}: {exc!r}")

    def _outcome(self, request: _Request, response: httpx.Response, attempt: int
                 ) -> float | None:
        """None: hand the response to the plan; a number: retry after that many seconds.
        Raises for an error status the plan does not handle (all but a 415 to ``.npy`` and a
        413 to several volumes)."""
        if response.status_code == 503 and attempt < self.max_retries:
            return retry_wait(response, attempt, self.max_retry_wait_s)
        sent_npy = request.headers.get("Content-Type") == formats.NPY_MEDIA_TYPE
        if (response.is_success or (response.status_code == 415 and sent_npy)
                or (response.status_code == 413 and request.volumes > 1)):
            return None
        raise _error(response)


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


def _answer_error(response: httpx.Response, problem: str) -> CryoLensAnswerError:
    request = response.request
    return CryoLensAnswerError(problem, request_id=response.headers.get("x-request-id"),
                               method=request.method, path=request.url.path)


def _batch_options(batch_size, return_reconstructions, return_embeddings, return_poses,
                   return_global_weights, operation, use_final_convolution,
                   use_predicted_pose) -> dict[str, Any]:
    return {"batch_size": batch_size, "return_reconstructions": return_reconstructions,
            "return_embeddings": return_embeddings, "return_poses": return_poses,
            "return_global_weights": return_global_weights, "operation": operation,
            "use_final_convolution": use_final_convolution,
            "use_predicted_pose": use_predicted_pose}


class CryoLensClient(_Core):
    """A blocking client; see the module docs. Use it as a context manager or call
    :meth:`close`. Option defaults of ``None`` leave the choice to the server (its documented
    defaults apply)."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(url, **kwargs)
        self._http = httpx.Client(transport=transport, **self._http_options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, request: _Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with self._http.stream(**_send_args(request, _once(request.content))) as got:
                    response = _detached(got, b"".join(got.iter_raw()))
            except httpx.TransportError as exc:
                raise self._connection_error(request, exc) from exc
            wait = self._outcome(request, response, attempt)
            if wait is None:
                return response
            time.sleep(wait)
            attempt += 1

    def _run(self, plan: _Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(self._send(request))
        except StopIteration as stop:
            return stop.value

    # -- endpoints -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "healthy"}`` while the process runs."""
        return self._run(self._get_plan("/health"))

    def ready(self) -> dict[str, Any]:
        """``GET /ready``: ``{"status": "ready"}`` once the model is loaded (503s are retried
        like any other)."""
        return self._run(self._get_plan("/ready"))

    def model_info(self) -> dict[str, Any]:
        """``GET /model_info``: the model's configuration, as the server's JSON."""
        return self._run(self._get_plan("/model_info"))

    def reconstruct(self, volumes: Any, *, use_segmented_decoder: bool | None = None,
                    use_final_convolution: bool | None = None,
                    return_splat_data: bool | None = None, return_embeddings: bool | None = None,
                    use_predicted_pose: bool | None = None, progress: bool | None = None
                    ) -> dict[str, np.ndarray]:
        """``POST /reconstruct``: ``reconstruction`` (and ``affinity_reconstruction``,
        ``free_reconstruction``, ``embedding(s)``, splat fields, as asked)."""
        return self._run(self._reconstruct(volumes, use_segmented_decoder,
                                           use_final_convolution, return_splat_data,
                                           return_embeddings, use_predicted_pose, progress))

    def extract_features(self, volumes: Any, *, return_pose: bool | None = None,
                         return_global_weight: bool | None = None,
                         return_variance: bool | None = None, progress: bool | None = None
                         ) -> dict[str, np.ndarray]:
        """``POST /extract_features``: ``embedding``, ``pose``, ``pose_axis_angle``,
        ``global_weight`` (and ``log_variance``, as asked)."""
        return self._run(self._extract_features(volumes, return_pose, return_global_weight,
                                                return_variance, progress))

    def extract_gaussian_splats(self, volumes: Any, *, include_free_segment: bool | None = None,
                                progress: bool | None = None) -> dict[str, np.ndarray]:
        """``POST /extract_gaussian_splats``: ``centers``, ``weights``, ``scales`` per volume;
        ``segment``, ``n_affinity``, ``n_free``, ``n_total`` shared."""
        return self._run(self._extract_gaussian_splats(volumes, include_free_segment, progress))

    def batch_process(self, volumes: Any, *, batch_size: int | None = None,
                      return_reconstructions: bool | None = None,
                      return_embeddings: bool | None = None, return_poses: bool | None = None,
                      return_global_weights: bool | None = None, operation: str | None = None,
                      use_final_convolution: bool | None = None,
                      use_predicted_pose: bool | None = None, progress: bool | None = None
                      ) -> dict[str, np.ndarray]:
        """``POST /batch_process``. ``batch_size`` here is the server's option (volumes per
        engine pass); how many volumes go in one request is the client's ``batch_size``."""
        options = _batch_options(batch_size, return_reconstructions, return_embeddings,
                                 return_poses, return_global_weights, operation,
                                 use_final_convolution, use_predicted_pose)
        return self._run(self._batch_process(volumes, options, progress))

    def statistics(self, volume: Any) -> dict[str, np.ndarray]:
        """``POST /statistics``: ``mean``, ``std``, ``min``, ``max`` (float64) and ``shape`` of
        any real array."""
        return self._run(self._statistics_plan(volume))


class AsyncCryoLensClient(_Core):
    """The asyncio twin of :class:`CryoLensClient`: the same methods, awaited."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, request: _Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                args = _send_args(request, _once_async(request.content))
                async with self._http.stream(**args) as got:
                    response = _detached(got, b"".join([part async for part in got.aiter_raw()]))
            except httpx.TransportError as exc:
                raise self._connection_error(request, exc) from exc
            wait = self._outcome(request, response, attempt)
            if wait is None:
                return response
            await asyncio.sleep(wait)
            attempt += 1

    async def _run(self, plan: _Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(await self._send(request))
        except StopIteration as stop:
            return stop.value

    async def health(self) -> dict[str, Any]:
        return await self._run(self._get_plan("/health"))

    async def ready(self) -> dict[str, Any]:
        return await self._run(self._get_plan("/ready"))

    async def model_info(self) -> dict[str, Any]:
        return await self._run(self._get_plan("/model_info"))

    async def reconstruct(self, volumes: Any, *, use_segmented_decoder: bool | None = None,
                          use_final_convolution: bool | None = None,
                          return_splat_data: bool | None = None,
                          return_embeddings: bool | None = None,
                          use_predicted_pose: bool | None = None, progress: bool | None = None
                          ) -> dict[str, np.ndarray]:
        return await self._run(self._reconstruct(volumes, use_segmented_decoder,
                                                 use_final_convolution, return_splat_data,
                                                 return_embeddings, use_predicted_pose,
                                                 progress))

    async def extract_features(self, volumes: Any, *, return_pose: bool | None = None,
                               return_global_weight: bool | None = None,
                               return_variance: bool | None = None,
                               progress: bool | None = None) -> dict[str, np.ndarray]:
        return await self._run(self._extract_features(volumes, return_pose, return_global_weight,
                                                      return_variance, progress))

    async def extract_gaussian_splats(self, volumes: Any, *,
                                      include_free_segment: bool | None = None,
                                      progress: bool | None = None) -> dict[str, np.ndarray]:
        return await self._run(self._extract_gaussian_splats(volumes, include_free_segment,
                                                             progress))

    async def batch_process(self, volumes: Any, *, batch_size: int | None = None,
                            return_reconstructions: bool | None = None,
                            return_embeddings: bool | None = None,
                            return_poses: bool | None = None,
                            return_global_weights: bool | None = None,
                            operation: str | None = None,
                            use_final_convolution: bool | None = None,
                            use_predicted_pose: bool | None = None,
                            progress: bool | None = None) -> dict[str, np.ndarray]:
        options = _batch_options(batch_size, return_reconstructions, return_embeddings,
                                 return_poses, return_global_weights, operation,
                                 use_final_convolution, use_predicted_pose)
        return await self._run(self._batch_process(volumes, options, progress))

    async def statistics(self, volume: Any) -> dict[str, np.ndarray]:
        return await self._run(self._statistics_plan(volume))

