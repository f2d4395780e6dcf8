"""The endpoints: each reads its body (``bodies.py``), describes the work as an
:class:`~cryolens.operations.Operation` for the inference worker, and writes the result as the
seed's JSON or as ``.npz`` (``responses.py``). The model endpoints are made from the rows of
:mod:`cryolens.contract` (path, options, operation, answer fields), one handler for all of
them. No model code and no torch here.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from cryolens import __version__, contract, formats, operations
from cryolens.contract import Endpoint
from cryolens.errors import Busy, InputError, NotReady
from cryolens.operations import Result
from cryolens.server import bodies, codecs, schemas
from cryolens.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cryolens.server.responses import NPZResponse, ORJSONResponse, wants_npz
from cryolens.server.settings import Settings

T = TypeVar("T")
_ERRORS = {422: {"model": schemas.ErrorResponse}, 500: {"model": schemas.ErrorResponse}}
_VOLUME_ERRORS = {**_ERRORS, **{status: {"model": schemas.ErrorResponse}
                                for status in (400, 413, 415, 503, 504)}}
#: Status logged (and counted) for a request whose client left before the answer.
CLIENT_CLOSED = 499


def _body_doc(model: type, binary: bool = True) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (orjson or numpy), so docs still show it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if binary:
        file = {"type": "string", "format": "binary"}
        content.update({
            "application/x-npy": {"schema": file},
            "application/octet-stream": {"schema": file},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": file}}},
        })
    return {"requestBody": {"required": True, "content": content}}


class ClientGone(Exception):
    """The client disconnected before its answer was sent: while its job was waiting or
    running (``stage`` "waiting": the job is cancelled, so a queued one never runs) or by the
    time it had run ("answer")."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, watching the connection meanwhile: :class:`ClientGone` when the client
    goes away first (``work`` is then cancelled) or had gone when it finished. Call only once
    the body has been read. (Cheaper than asking ``request.is_disconnected()`` afterwards: that
    is an anyio cancel scope per request.)"""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if not task.done():
        task.cancel()
        raise ClientGone("waiting")
    left = watch.done()
    watch.cancel()
    if left:  # exceptions retrieved, so asyncio does not log them: nobody is left to tell
        watch.exception()
        if not task.cancelled():
            task.exception()
        raise ClientGone("answer")
    return task.result()


def parse_room(request: Request):
    """Reserve this request's body in the server-wide parse budget as its bytes arrive (503
    when the budget stays full); returned when the block ends."""
    return request.app.state.parse_budget.reserve_body(request)


def engine_of(request: Request):
    worker = request.app.state.worker
    fault = worker.fault()
    if fault is not None:
        raise Busy(f"the server is restarting: {fault}")
    if not worker.ready.is_set():
        raise NotReady("the model is still loading; retry in a few seconds")
    return worker.engine


#: Seconds between looks at the worker while a request waits for the model to load.
_LOAD_POLL_S = 0.05


async def loaded_engine(request: Request, timeout_s: float):
    """The engine, waiting (up to ``timeout_s``) while it loads: a request sent just after
    start-up is answered once the model is ready instead of being refused."""
    worker = request.app.state.worker
    waited = 0.0
    while not worker.ready.is_set() and waited < timeout_s:
        await asyncio.sleep(_LOAD_POLL_S)
        waited += _LOAD_POLL_S
    return engine_of(request)


def add_routes(app: FastAPI, settings: Settings) -> None:
    """Every route."""
    _add_info_routes(app, settings)
    _add_model_routes(app, settings)
    _add_statistics_routes(app, settings)


# -- server information -------------------------------------------------------------------
def _add_info_routes(app: FastAPI, settings: Settings) -> None:
    @app.get("/", response_model=schemas.response_model(contract.ROOT),
             summary=contract.ROOT.summary)
    async def root() -> ORJSONResponse:
        endpoints = [
            {"path": route.path, "methods": sorted(route.methods or ()),
             "summary": getattr(route, "summary", None) or ""}
            for route in app.routes if getattr(route, "include_in_schema", False)
        ]
        return ORJSONResponse({"service": app.title, "version": __version__,
                               "status": "running", "endpoints": endpoints})

    @app.get("/health", response_model=schemas.response_model(contract.HEALTH),
             summary=contract.HEALTH.summary, responses={503: {"model": schemas.ErrorResponse}})
    async def health(request: Request) -> ORJSONResponse:
        fault = request.app.state.worker.fault()
        if fault is not None:
            return ORJSONResponse({"status": "unhealthy", "detail": fault}, status_code=503)
        return ORJSONResponse({"status": "healthy"})

    @app.get("/ready", response_model=schemas.response_model(contract.READY),
             summary=contract.READY.summary, responses={503: {"model": schemas.ErrorResponse}})
    async def ready(request: Request) -> ORJSONResponse:
        engine_of(request)
        return ORJSONResponse({"status": "ready"})

    @app.get("/metrics", summary=contract.METRICS.summary, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics(request: Request) -> Response:
        worker = request.app.state.worker
        engine = worker.engine
        text = request.app.state.metrics.render(
            worker.pending, worker.ready.is_set(),
            engine.device.type if engine is not None else None)
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    @app.get("/model_info", response_model=schemas.response_model(contract.MODEL_INFO),
             summary=contract.MODEL_INFO.summary,
             responses={503: {"model": schemas.ErrorResponse}})
    async def model_info(request: Request) -> ORJSONResponse:
        engine = await loaded_engine(request, settings.request_timeout_s)
        config = engine.config
        name, sha = checkpoint_info(engine)
        return ORJSONResponse({
            "latent_dim": config.latent_dims, "latent_ratio": config.latent_ratio,
            "n_gaussians": config.n_splats, "input_shape": list(engine.box_shape),
            "device": engine.device.type, "n_affinity": config.n_affinity,
            "n_free": config.n_free, "affinity_dims": config.affinity_dims,
            "checkpoint": name, "sha256": sha, "normalisation": "z-score"})


def checkpoint_info(engine) -> tuple[str, str]:
    """(file or registry name, never a path; sha256) of the engine's checkpoint."""
    from pathlib import Path

    info = getattr(engine, "checkpoint", None)
    name = getattr(info, "display_name", None) or getattr(info, "name", None) or "in-memory"
    return Path(str(name)).name, getattr(info, "sha256", None) or ""


# -- model endpoints ------------------------------------------------------------------------
def answer(endpoint: Endpoint, parsed: bodies.Parsed, options: dict[str, Any],
           result: Result) -> dict[str, Any]:
    """The seed's JSON payload for ``result``, as the endpoint's row describes it."""
    facts = endpoint.facts(result.arrays, parsed.volumes.shape, parsed.stacked,
                           parsed.voxel_size)
    return endpoint.payload({**result.arrays, **result.shared, **facts}, options,
                            parsed.stacked)


async def respond(request: Request, endpoint: Endpoint, payload: dict[str, Any]) -> Response:
    arrays = endpoint.flat(payload)
    size = sum(v.nbytes for v in arrays.values() if isinstance(v, np.ndarray))
    if wants_npz(request):
        return NPZResponse(await bodies.off_loop(request, lambda: formats.write_npz(arrays), size))
    return ORJSONResponse(await bodies.off_loop(request, lambda: codecs.dumps(payload), 8 * size))


def _add_model_routes(app: FastAPI, settings: Settings) -> None:
    for endpoint in contract.MODEL_ENDPOINTS:
        _add_model_route(app, settings, endpoint)


def _add_model_route(app: FastAPI, settings: Settings, endpoint: Endpoint) -> None:
    options_model = schemas.options_model(endpoint)

    async def handler(request: Request) -> Response:
        worker = request.app.state.worker
        rid = request.scope.get("state", {}).get("request_id", "")
        with worker.arriving():  # a batch being formed waits for this request
            engine = await loaded_engine(request, settings.request_timeout_s)
            async with parse_room(request):
                parsed = await bodies.read_volumes(
                    request, options_model, endpoint.volumes, box=tuple(engine.box_shape),
                    max_volumes=settings.max_volumes, batch=endpoint.batch)
            options = vars(parsed.options)  # the validated fields (a dict(model) costs 6 us)
            job = worker.enqueue(endpoint.operation(options), parsed.volumes, rid)
        try:
            result = await unless_disconnected(request, job)
        except ClientGone as gone:  # nothing to serialise
            request.app.state.metrics.disconnected(gone.stage)
            return Response(status_code=CLIENT_CLOSED)
        except InputError as exc:  # the engine names its argument; the client sent a field
            if exc.field != "volumes":
                raise
            raise type(exc)(exc.message, field=parsed.field) from None
        return await respond(request, endpoint, answer(endpoint, parsed, options, result))

    app.add_api_route(endpoint.path, handler, methods=["POST"],
                      response_model=schemas.response_model(endpoint), summary=endpoint.summary,
                      responses=_VOLUME_ERRORS,
                      openapi_extra=_body_doc(schemas.request_model(endpoint)),
                      name=endpoint.path.strip("/"))


# -- statistics -------------------------------------------------------------------------------
def _statistics(value: Any, field: str) -> dict[str, Any]:
    array = value if isinstance(value, np.ndarray) else \
        codecs.array_of_numbers(value, field, dtype=np.float64)
    if array.size == 0:
        raise InputError(f"{field} is empty: expected at least one number", field=field)
    if array.dtype.kind == "f" and not np.isfinite(array).all():  # .npy and MRC bodies
        raise InputError(f"{field} must be finite: a value is NaN or infinite", field=field)
    stats = operations.statistics(array)
    if not all(np.isfinite(stats[k]) for k in ("mean", "std", "min", "max")):
        raise InputError(f"{field}: the statistics overflow float64 (values near 1.8e308)",
                         field=field)
    return stats


def _statistics_json(body: bytes) -> dict[str, Any]:
    """Statistics of a JSON body's ``volume`` (or its alias ``volume_data``). A large body's
    volume is read from its JSON text a piece at a time, as the model endpoints read theirs
    (:func:`codecs.read_large_json`), never parsed whole."""
    def split(body: bytes) -> dict[str, Any]:
        # the field left as text: the one the payload rule below will pick
        alias = not codecs.names_key(body, "volume") and codecs.names_key(body, "volume_data")
        return codecs.loads_with_raw_field(body, "volume_data" if alias else "volume")

    def read(payload: dict[str, Any]) -> dict[str, Any]:
        field = "volume_data" if "volume" not in payload and "volume_data" in payload \
            else "volume"
        if field not in payload:
            raise InputError(f"{field} is required", field=field)
        return _statistics(payload[field], field)

    return codecs.read_large_json(body, split, read)


def _add_statistics_routes(app: FastAPI, settings: Settings) -> None:
    @app.get("/statistics", response_model=schemas.response_model(contract.STATISTICS),
             summary=contract.STATISTICS.summary,
             responses={**_ERRORS, 400: {"model": schemas.ErrorResponse}})
    async def statistics_get(
        request: Request,
        volume: str | None = Query(None, description="URL-encoded JSON array of numbers, any "
                                   "shape. Large volumes: POST /statistics."),
        volume_data: str | None = Query(None, description="Alias of `volume`."),
    ) -> ORJSONResponse:
        field, text = ("volume", volume) if volume is not None else ("volume_data", volume_data)
        if text is None:
            raise InputError("query parameter volume (or volume_data) is required",
                             field="volume")
        value = codecs.loads_json(text.encode(), field)
        return ORJSONResponse(await bodies.off_loop(request, lambda: _statistics(value, field)))

    @app.post("/statistics", response_model=schemas.response_model(contract.STATISTICS),
              summary="Statistics of a volume sent as JSON, .npy or MRC",
              responses=_VOLUME_ERRORS,
              openapi_extra=_body_doc(schemas.StatisticsRequest))
    async def statistics_post(request: Request) -> ORJSONResponse:
        async with parse_room(request):
            return await _statistics_post(request)

    async def _statistics_post(request: Request) -> ORJSONResponse:
        if codecs.is_json_content_type(bodies.media_type(request)):
            body = await request.body()
            return ORJSONResponse(await bodies.off_loop(request, lambda: _statistics_json(body)))
        read = await bodies.binary_reader(request)
        return ORJSONResponse(await bodies.off_loop(
            request, lambda: _statistics(read().data, "body")))
