"""What the clients send, as plans: a plan is a generator that yields requests, is sent their
answers and returns the result, so that the blocking and the asyncio client
(:mod:`cryolens.client`) share every decision (how many volumes a request, ``.npy`` or JSON,
what a 413 or 415 means, when to retry) and differ only in how they send."""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Generator
from typing import Any

import httpx
import numpy as np

from cryolens import __version__, contract, formats
from cryolens.answers import (
    Gathered,
    answer_error,
    check_rows,
    first_volume,
    with_leading_axis,
)
from cryolens.checked import CheckedVolumes, float32
from cryolens.contract import Endpoint
from cryolens.errors import InputError
from cryolens.wire import (
    JSON_MEDIA_TYPE,
    CryoLensConnectionError,
    Request,
    decode,
    error_of,
    json_arrays,
    json_request,
    npy_request,
    retry_wait,
    volume_json_request,
)

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
USER_AGENT = f"cryolens-client/{__version__}"


def server_url(url: str) -> str:
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


Plan = Generator[Request, httpx.Response, Any]


class ClientCore:
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
        self.url = server_url(url)
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
    def _get_plan(self, path: str) -> Plan:
        response = yield Request("GET", path, headers={"Accept": JSON_MEDIA_TYPE})
        return response.json()

    def _statistics_plan(self, volume: Any) -> Plan:
        array = np.asarray(volume)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError("volume must be finite: it holds NaN or infinity", field="volume")
        if self.binary:
            response = yield Request("POST", "/statistics", content=formats.write_npy(array),
                                      headers={"Content-Type": formats.NPY_MEDIA_TYPE})
            if response.status_code != 415:
                return json_arrays(response.json(), contract.STATISTICS)
            self.binary = False
        response = yield json_request("/statistics", {"volume": array.tolist()})
        return json_arrays(response.json(), contract.STATISTICS)

    def _volumes_plan(self, endpoint: Endpoint, volumes: Any, options: dict[str, Any],
                      progress: bool | None) -> Plan:
        """``volumes`` (one volume, a stack, or :class:`CheckedVolumes` already checked by the
        caller) to ``endpoint`` with ``options`` (None: the server's default)."""
        endpoint.defaults(options)  # an option the endpoint lacks: TypeError, nothing sent
        checked = CheckedVolumes.check(volumes, step=self.batch_size,
                                       after="; nothing was sent")
        stack, stacked = checked.array, checked.stacked
        total = len(stack)
        bar = self._bar(endpoint.path, total, progress if progress is not None
                        else self.progress)
        gathered = Gathered(total)
        try:
            start = 0
            while start < total:
                if self.binary:
                    part = float32(stack[start:start + self.batch_size])
                    sent = part if (stacked or endpoint.batch) else part[0]
                    response = yield npy_request(endpoint, sent, options)
                    if response.status_code == 415:  # an old server: JSON from now on
                        self.binary = False
                        continue
                else:
                    part = float32(stack[start:start + (self.batch_size if endpoint.batch
                                                         else 1)])
                    # the JSON contract: one volume per request, except /batch_process
                    sent = part if endpoint.batch else part[0]
                    response = yield volume_json_request(endpoint, sent, options)
                if response.status_code == 413:  # more than the server takes: send fewer
                    self._fewer_volumes(len(part), response)
                    continue
                result = decode(response, endpoint)
                try:
                    check_rows(result, len(part) if sent.ndim == 4 else None)
                    if stacked or endpoint.batch:
                        gathered.add(result if sent.ndim == 4 else with_leading_axis(result),
                                     len(part))
                except ValueError as exc:
                    raise answer_error(response, str(exc)) from None
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
            return first_volume(merged)
        if "input_shape" in merged and not endpoint.batch:
            merged["input_shape"] = np.asarray(stack.shape)
        return merged

    def _fewer_volumes(self, sent: int, response: httpx.Response) -> None:
        """A server that refused ``sent`` volumes in one request (413: its ``--max-volumes``
        or body limit is below this client's ``batch_size``) gets half as many a request from
        now on, which the caller is told once per halving."""
        self.batch_size = max(1, sent // 2)
        warnings.warn(f"{self.url} refused {sent} volumes in one request "
                      f"({error_of(response).detail_text}); sending {self.batch_size} a request "
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
        return self._volumes_plan(contract.RECONSTRUCT, volumes, {
            "use_segmented_decoder": use_segmented_decoder,
            "use_final_convolution": use_final_convolution,
            "return_splat_data": return_splat_data, "return_embeddings": return_embeddings,
            "use_predicted_pose": use_predicted_pose}, progress)

    def _extract_features(self, volumes, return_pose, return_global_weight, return_variance,
                          progress):
        return self._volumes_plan(contract.FEATURES, volumes, {
            "return_pose": return_pose, "return_global_weight": return_global_weight,
            "return_variance": return_variance}, progress)

    def _extract_gaussian_splats(self, volumes, include_free_segment, progress):
        return self._volumes_plan(contract.SPLATS, volumes,
                                  {"include_free_segment": include_free_segment}, progress)

    def _batch_process(self, volumes, options, progress):
        return self._volumes_plan(contract.BATCH, volumes, options, progress)

    def _post(self, path: str, volumes: Any, options: dict[str, Any], progress: bool | None
              ) -> Plan:
        endpoint = contract.ENDPOINTS.get(path)
        if endpoint is None or endpoint.operation is None:
            known = ", ".join(e.path for e in contract.MODEL_ENDPOINTS)
            raise InputError(f"{path!r} is not an endpoint that takes volumes; these do: "
                             f"{known}", field="path")
        return self._volumes_plan(endpoint, volumes, options, progress)

    # -- sending -------------------------------------------------------------------------------
    def _connection_error(self, request: Request, exc: httpx.TransportError
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

    def _outcome(self, request: Request, response: httpx.Response, attempt: int
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
        raise error_of(response)


def batch_options(batch_size, return_reconstructions, return_embeddings, return_poses,
                   return_global_weights, operation, use_final_convolution,
                   use_predicted_pose) -> dict[str, Any]:
    return {"batch_size": batch_size, "return_reconstructions": return_reconstructions,
            "return_embeddings": return_embeddings, "return_poses": return_poses,
            "return_global_weights": return_global_weights, "operation": operation,
            "use_final_convolution": use_final_convolution,
            "use_predicted_pose": use_predicted_pose}
