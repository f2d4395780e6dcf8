"""The endpoints: each reads its body (``bodies.py``), describes the work as an
:class:`~cryolens.operations.Operation` for the inference worker, and writes the result as the
seed's JSON or as ``.npz`` (``responses.py``). No model code and no torch here.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from cryolens import __version__, formats, operations
from cryolens.errors import Busy, InputError, NotReady
from cryolens.operations import Operation, Result
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
    @app.get("/", response_model=schemas.RootResponse, summary="Server metadata and endpoints")
    async def root() -> ORJSONResponse:
        endpoints = [
            {"path": route.path, "methods": sorted(route.methods or ()),
             "summary": getattr(route, "summary", None) or ""}
            for route in app.routes if getattr(route, "include_in_schema", False)
        ]
        return ORJSONResponse({"service": app.title, "version": __version__,
                               "status": "running", "endpoints": endpoints})

    @app.get("/health", response_model=schemas.HealthResponse,
             summary="Liveness check (never touches the model): 503 once the inference "
                     "thread is gone or stuck", responses={503: {"model": schemas.ErrorResponse}})
    async def health(request: Request) -> ORJSONResponse:
        fault = request.app.state.worker.fault()
        if fault is not None:
            return ORJSONResponse({"status": "unhealthy", "detail": fault}, status_code=503)
        return ORJSONResponse({"status": "healthy"})

    @app.get("/ready", response_model=schemas.HealthResponse,
             summary="Readiness: 200 once the model is loaded and warmed up, 503 before",
             responses={503: {"model": schemas.ErrorResponse}})
    async def ready(request: Request) -> ORJSONResponse:
        engine_of(request)
        return ORJSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics(request: Request) -> Response:
        worker = request.app.state.worker
        engine = worker.engine
        text = request.app.state.metrics.render(
            worker.pending, worker.ready.is_set(),
            engine.device.type if engine is not None else None)
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    @app.get("/model_info", response_model=schemas.ModelInfoResponse,
             summary="Model configuration", responses={503: {"model": schemas.ErrorResponse}})
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
def _shape_fields(parsed: bodies.Parsed) -> dict[str, Any]:
    shape = parsed.volumes.shape if parsed.stacked else parsed.volumes.shape[1:]
    out: dict[str, Any] = {"input_shape": list(shape)}
    if parsed.voxel_size is not None:
        out["voxel_size"] = list(parsed.voxel_size)
    return out


def _one(parsed: bodies.Parsed, array: np.ndarray) -> np.ndarray:
    """The array as the client asked: with its leading N for a stack, without for one volume."""
    return array if parsed.stacked else array[0]


def _splat_fields(parsed: bodies.Parsed, result: Result) -> dict[str, Any]:
    return {"centers": _one(parsed, result.arrays["centers"]),
            "weights": _one(parsed, result.arrays["weights"]),
            "scales": _one(parsed, result.arrays["scales"]),
            "segment": result.shared["segment"],
            **{k: int(result.shared[k]) for k in ("n_affinity", "n_free", "n_total")}}


def reconstruct_payload(parsed: bodies.Parsed, result: Result) -> dict[str, Any]:
    opts = parsed.options
    rec = _one(parsed, result.arrays["reconstruction"])
    payload: dict[str, Any] = {"reconstruction": rec, **_shape_fields(parsed),
                               "reconstruction_shape": list(rec.shape)}
    if opts.return_embeddings:
        payload["embeddings"] = payload["embedding"] = _one(parsed, result.arrays["embedding"])
    if opts.use_segmented_decoder:
        payload["segmented_outputs"] = {
            "affinity": _one(parsed, result.arrays["affinity_reconstruction"]),
            "free": _one(parsed, result.arrays["free_reconstruction"])}
    if opts.return_splat_data:
        payload["splats"] = _splat_fields(parsed, result)
    return payload


def features_payload(parsed: bodies.Parsed, result: Result) -> dict[str, Any]:
    opts, arrays = parsed.options, result.arrays
    embedding = _one(parsed, arrays["embedding"])
    payload: dict[str, Any] = {"embedding": embedding, "embeddings": embedding}
    if opts.return_pose:
        payload["pose"] = _one(parsed, arrays["pose"])
        payload["pose_axis_angle"] = _one(parsed, arrays["pose_axis_angle"])
    if opts.return_global_weight:
        weight = _one(parsed, arrays["global_weight"])
        payload["global_weight"] = weight if parsed.stacked else float(weight)
    if opts.return_variance:
        payload["log_variance"] = _one(parsed, arrays["log_variance"])
    payload.update(_shape_fields(parsed))
    payload["latent_dims"] = int(arrays["embedding"].shape[1])
    return payload


def splats_payload(parsed: bodies.Parsed, result: Result) -> dict[str, Any]:
    return {**_splat_fields(parsed, result), **_shape_fields(parsed)}


def batch_operation(opts: schemas.BatchOptions) -> Operation:
    if opts.operation == "splats":
        return Operation("splats")
    if opts.return_reconstructions and opts.operation in (None, "reconstruction"):
        return Operation("reconstruct", use_predicted_pose=opts.use_predicted_pose,
                         final_convolution=opts.use_final_convolution)
    return Operation("features")


def batch_payload(parsed: bodies.Parsed, result: Result) -> dict[str, Any]:
    opts, arrays = parsed.options, result.arrays
    payload: dict[str, Any] = {}
    if "reconstruction" in arrays:
        payload["reconstructions"] = arrays["reconstruction"]
    if "centers" in arrays:
        payload.update(centers=arrays["centers"], weights=arrays["weights"],
                       scales=arrays["scales"])
    if opts.return_embeddings:
        payload["embeddings"] = arrays["embedding"]
    if opts.return_poses:
        payload["poses"] = arrays["pose"]
    if opts.return_global_weights:
        payload["global_weights"] = arrays["global_weight"]
    n = len(parsed.volumes)
    payload.update(n_volumes=n, num_processed=n, input_shape=list(parsed.volumes.shape[1:]))
    if parsed.voxel_size is not None:
        payload["voxel_size"] = list(parsed.voxel_size)
    return payload


def npz_arrays(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON payload as flat named arrays: segments become ``affinity_reconstruction`` and
    ``free_reconstruction``; the splat fields sit at the top level."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if key == "segmented_outputs":
            out.update({f"{name}_reconstruction": v for name, v in value.items()})
        elif isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


async def respond(request: Request, payload: dict[str, Any]) -> Response:
    size = sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray))
    if wants_npz(request):
        arrays = npz_arrays(payload)
        return NPZResponse(await bodies.off_loop(request, lambda: formats.write_npz(arrays), size))
    return ORJSONResponse(await bodies.off_loop(request, lambda: codecs.dumps(payload), 8 * size))


def _add_model_routes(app: FastAPI, settings: Settings) -> None:

    def endpoint(path: str, *, request_model: type, options: type, field: str, batch: bool,
                 operation, payload, response_model: type, summary: str) -> None:
        async def handler(request: Request) -> Response:
            worker = request.app.state.worker
            rid = request.scope.get("state", {}).get("request_id", "")
            with worker.arriving():  # a batch being formed waits for this request
                engine = await loaded_engine(request, settings.request_timeout_s)
                async with parse_room(request):
                    parsed = await bodies.read_volumes(
                        request, options, field, box=tuple(engine.box_shape),
                        max_volumes=settings.max_volumes, batch=batch)
                job = worker.enqueue(operation(parsed.options), parsed.volumes, rid)
            try:
                result = await unless_disconnected(request, job)
            except ClientGone as gone:  # nothing to serialise
                request.app.state.metrics.disconnected(gone.stage)
                return Response(status_code=CLIENT_CLOSED)
            except InputError as exc:  # the engine names its argument; the client sent a field
                if exc.field != "volumes":
                    raise
                raise type(exc)(exc.message, field=parsed.field) from None
            return await respond(request, payload(parsed, result))

        app.add_api_route(path, handler, methods=["POST"], response_model=response_model,
                          summary=summary, responses=_VOLUME_ERRORS,
                          openapi_extra=_body_doc(request_model), name=path.strip("/"))

    endpoint("/reconstruct", request_model=schemas.ReconstructRequest,
             options=schemas.ReconstructOptions, field="input_volume", batch=False,
             operation=lambda o: Operation(
                 "reconstruct", use_predicted_pose=o.use_predicted_pose,
                 final_convolution=o.use_final_convolution, segments=o.use_segmented_decoder,
                 with_splats=o.return_splat_data),
             payload=reconstruct_payload, response_model=schemas.ReconstructResponse,
             summary="Reconstruct a volume through the VAE")
    endpoint("/extract_features", request_model=schemas.FeaturesRequest,
             options=schemas.FeaturesOptions, field="input_volume", batch=False,
             operation=lambda o: Operation("features"), payload=features_payload,
             response_model=schemas.FeaturesResponse,
             summary="Embedding, pose and global weight of a volume")
    endpoint("/extract_gaussian_splats", request_model=schemas.SplatsRequest,
             options=schemas.SplatsOptions, field="input_volume", batch=False,
             operation=lambda o: Operation("splats", include_free=o.include_free_segment),
             payload=splats_payload, response_model=schemas.SplatsResponse,
             summary="Gaussian splats of a volume (voxels, z-y-x)")
    endpoint("/batch_process", request_model=schemas.BatchRequest,
             options=schemas.BatchOptions, field="input_volumes", batch=True,
             operation=batch_operation, payload=batch_payload,
             response_model=schemas.BatchResponse, summary="Process many volumes in batches")


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
    @app.get("/statistics", response_model=schemas.StatisticsResponse,
             summary="Mean, std, min, max and shape of a small volume",
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

    @app.post("/statistics", response_model=schemas.StatisticsResponse,
              summary="Statistics of a volume sent as JSON, .npy or MRC",
              responses=_VOLUME_ERRORS, openapi_extra=_body_doc(schemas.StatisticsRequest))
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
