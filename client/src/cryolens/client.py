"""A Python client for the CryoLens REST server: numpy in, numpy out.

Needs only numpy and httpx (tqdm for ``progress=True``), never PyTorch::

    from cryolens.client import CryoLensClient

    with CryoLensClient("http://localhost:8023") as client:
        features = client.extract_features(particles)   # (N, 48, 48, 48) float32
        features["embedding"]                           # (N, latent_dims)

One method per endpoint, named after it (and ``post(path, volumes, **options)`` for any model
endpoint of :mod:`cryolens.contract`). The model endpoints take one volume ``(D, H, W)`` or a
stack ``(N, D, H, W)`` and return a dict of numpy arrays named by the contract's fields (the
``.npz`` names: ``segmented_outputs`` become ``affinity_reconstruction`` and
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
raises :class:`CryoLensAnswerError` with the request id, never a result. Volumes that are not
one volume or a stack, or that hold NaN or infinity, are an
:class:`~cryolens.errors.InputError` before anything is sent.

The parts: requests and answers as data, and the server's errors (:mod:`cryolens.wire`);
volumes and answers checked, a stack's answers gathered (:mod:`cryolens.answers`); what to send
and what an answer means, as plans both clients run (:mod:`cryolens.plans`).
:class:`CryoLensClient` and :class:`AsyncCryoLensClient` below only differ in how they send:
each endpoint is one line that runs the same plan.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np

from cryolens.contract import COUNTS, PER_VOLUME, SHARED
from cryolens.plans import (
    CONNECT_TIMEOUT_S,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_RETRIES,
    DEFAULT_URL,
    MAX_RETRY_WAIT_S,
    READ_TIMEOUT_S,
    USER_AGENT,
    ClientCore,
    Plan,
    batch_options,
)
from cryolens.wire import (
    FALLBACK_RETRY_WAIT_S,
    JSON_MEDIA_TYPE,
    CryoLensAnswerError,
    CryoLensConnectionError,
    CryoLensHTTPError,
    Request,
    detached,
    once,
    once_async,
    retry_wait,
    send_args,
)


class CryoLensClient(ClientCore):
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

    def _send(self, request: Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with self._http.stream(**send_args(request, once(request.content))) as got:
                    response = detached(got, b"".join(got.iter_raw()))
            except httpx.TransportError as exc:
                raise self._connection_error(request, exc) from exc
            wait = self._outcome(request, response, attempt)
            if wait is None:
                return response
            time.sleep(wait)
            attempt += 1

    def _run(self, plan: Plan) -> Any:
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
        options = batch_options(batch_size, return_reconstructions, return_embeddings,
                                 return_poses, return_global_weights, operation,
                                 use_final_convolution, use_predicted_pose)
        return self._run(self._batch_process(volumes, options, progress))

    def statistics(self, volume: Any) -> dict[str, np.ndarray]:
        """``POST /statistics``: ``mean``, ``std``, ``min``, ``max`` (float64) and ``shape`` of
        any real array."""
        return self._run(self._statistics_plan(volume))

    def post(self, path: str, volumes: Any, *, progress: bool | None = None, **options: Any
             ) -> dict[str, np.ndarray]:
        """Any model endpoint of :data:`cryolens.contract.ENDPOINTS` by its path, with its
        options as keywords (one the endpoint lacks is a TypeError, before sending): the
        methods above are this with their options spelled out."""
        return self._run(self._post(path, volumes, options, progress))


class AsyncCryoLensClient(ClientCore):
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

    async def _send(self, request: Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                args = send_args(request, once_async(request.content))
                async with self._http.stream(**args) as got:
                    response = detached(got, b"".join([part async for part in got.aiter_raw()]))
            except httpx.TransportError as exc:
                raise self._connection_error(request, exc) from exc
            wait = self._outcome(request, response, attempt)
            if wait is None:
                return response
            await asyncio.sleep(wait)
            attempt += 1

    async def _run(self, plan: Plan) -> Any:
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
        options = batch_options(batch_size, return_reconstructions, return_embeddings,
                                 return_poses, return_global_weights, operation,
                                 use_final_convolution, use_predicted_pose)
        return await self._run(self._batch_process(volumes, options, progress))

    async def statistics(self, volume: Any) -> dict[str, np.ndarray]:
        return await self._run(self._statistics_plan(volume))

    async def post(self, path: str, volumes: Any, *, progress: bool | None = None,
                   **options: Any) -> dict[str, np.ndarray]:
        return await self._run(self._post(path, volumes, options, progress))


# the settings, fields and errors of the modules the clients are built on, importable from here
__all__ = ["CONNECT_TIMEOUT_S", "COUNTS", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_RETRIES",
           "DEFAULT_URL", "FALLBACK_RETRY_WAIT_S", "JSON_MEDIA_TYPE", "MAX_RETRY_WAIT_S",
           "PER_VOLUME", "READ_TIMEOUT_S", "SHARED", "USER_AGENT", "AsyncCryoLensClient",
           "CryoLensAnswerError", "CryoLensClient", "CryoLensConnectionError",
           "CryoLensHTTPError", "retry_wait"]
