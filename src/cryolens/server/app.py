"""The HTTP application: ``create_app(settings)`` builds the routes, limits and error mapping.

Routes only translate HTTP to engine calls: bodies are parsed off the event loop (orjson +
numpy), inference runs on the single worker thread, and responses are written with orjson.
This module never imports torch; the engine is loaded in the lifespan, once per process.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cryolens import __version__
from cryolens.errors import Busy, CryoLensError, InferenceTimeout, InputError, PayloadTooLarge
from cryolens.server import codecs, schemas
from cryolens.server.codecs import ORJSONResponse
from cryolens.server.settings import Settings
from cryolens.server.worker import InferenceWorker

logger = logging.getLogger("cryolens.server")

SERVICE_NAME = "CryoLens VAE Server"
STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/static"
#: Exit status when the model cannot load: uvicorn's own "startup failed", which also stops a
#: ``--workers N`` supervisor instead of restarting the child forever.
STARTUP_FAILURE_EXIT = 3
#: Validation errors reported per response (the rest are counted, not listed).
MAX_REPORTED_ERRORS = 5

_ERRORS = {422: {"model": schemas.ErrorResponse}, 500: {"model": schemas.ErrorResponse}}
_VOLUME_ERRORS = {**_ERRORS, 400: {"model": schemas.ErrorResponse},
                  413: {"model": schemas.ErrorResponse}, 415: {"model": schemas.ErrorResponse},
                  503: {"model": schemas.ErrorResponse}}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (orjson), so docs still show the model."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


# -- middleware ------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class _TrackedSend:
    """``send`` that remembers whether the response has started: after that, an error can no
    longer become an error response."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: by Content-Length up front, else by counting chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        tracked = _TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except _BodyTooLarge:
            if tracked.started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = ORJSONResponse(
            {"detail": f"request body is larger than the limit of {self.max_bytes} bytes",
             "field": "body"}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


class ErrorMiddleware:
    """Any exception that escapes a route: logged with its traceback, answered with a bare 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except _BodyTooLarge:
            raise
        except Exception:
            request_id = uuid.uuid4().hex
            logger.exception("internal error in %s %s (request_id %s)", scope.get("method"),
                             scope.get("path"), request_id)
            if tracked.started:
                raise
            response = ORJSONResponse({"detail": "internal error", "request_id": request_id},
                                      status_code=500, headers={"X-Request-ID": request_id})
            await response(scope, receive, send)


# -- error mapping ---------------------------------------------------------------------------
def _error_entries(errors: list[dict[str, Any]], prefix: tuple = ()) -> list[dict[str, Any]]:
    """loc, type and msg only: never the ``input`` (it may be a 2 MB volume)."""
    out = [{"loc": [*prefix, *err.get("loc", ())], "type": err.get("type", ""),
            "msg": codecs.truncate(str(err.get("msg", "")))}
           for err in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        out.append({"loc": [], "type": "truncated",
                    "msg": f"{len(errors) - MAX_REPORTED_ERRORS} more errors not shown"})
    return out


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> ORJSONResponse:
        status = 413 if isinstance(exc, PayloadTooLarge) else 422
        if isinstance(exc, codecs.MalformedJSON):
            status = 400
        return ORJSONResponse({"detail": codecs.truncate(exc.message, 500), "field": exc.field},
                              status_code=status)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> ORJSONResponse:
        return ORJSONResponse({"detail": str(exc)}, status_code=503,
                              headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(InferenceTimeout)
    async def timeout(request: Request, exc: InferenceTimeout) -> ORJSONResponse:
        return ORJSONResponse({"detail": str(exc)}, status_code=504)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError
                                 ) -> ORJSONResponse:
        return ORJSONResponse({"detail": _error_entries(list(exc.errors()))}, status_code=422)

    @app.exception_handler(ValidationError)
    async def options_validation(request: Request, exc: ValidationError) -> ORJSONResponse:
        return ORJSONResponse({"detail": _error_entries(exc.errors(), ("body",))},
                              status_code=422)


# -- lifespan --------------------------------------------------------------------------------
def _load_engine(settings: Settings):
    """Load the checkpoint or stop the process with one line on stderr (no traceback)."""
    try:
        from cryolens.engine import Engine

        return Engine.from_checkpoint(settings.checkpoint, device=settings.device)
    except Exception as exc:  # noqa: BLE001 - every failure here ends the process the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, CryoLensError) else f"{type(exc).__name__}: "
        sys.stderr.write(f"cryolens-server: cannot load checkpoint {settings.checkpoint!r} "
                         f"on device {settings.device!r}: {kind}{reason}\n")
        sys.stderr.flush()
        os._exit(STARTUP_FAILURE_EXIT)


def _configure_logging(level: str) -> None:
    package_logger = logging.getLogger("cryolens")
    package_logger.setLevel(level)
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.propagate = False


def _checkpoint_info(engine) -> tuple[str, str]:
    info = getattr(engine, "checkpoint", None)
    name = getattr(info, "display_name", None) or getattr(info, "name", None) or "in-memory"
    return Path(str(name)).name, getattr(info, "sha256", None) or ""


# -- the app ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, engine=None) -> FastAPI:
    """Build the server. ``engine`` (an already loaded :class:`cryolens.engine.Engine`) skips
    loading the checkpoint named in ``settings``; tests use it."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _configure_logging(settings.log_level)
        loaded = engine if engine is not None else _load_engine(settings)
        worker = InferenceWorker(loaded, settings.queue_size, settings.retry_after_s)
        worker.start()
        app.state.engine, app.state.worker = loaded, worker
        name, sha = _checkpoint_info(loaded)
        logger.info("serving checkpoint %s (sha256 %s) on %s", name, sha[:12], loaded.device)
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title=SERVICE_NAME, version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, default_response_class=ORJSONResponse,
                  description="CryoLens particle VAE over HTTP: reconstructions, embeddings, "
                              "poses and Gaussian splats of 48^3 cryo-ET particles.")
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app, settings)
    app.add_middleware(ErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_credentials=False, allow_methods=["*"], allow_headers=["*"])
    _add_docs_routes(app)
    _add_info_routes(app)
    _add_volume_routes(app, settings)
    return app


def _add_docs_routes(app: FastAPI) -> None:
    def static(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{STATIC_PREFIX}/{name}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url(request), title=f"{SERVICE_NAME} - Swagger UI",
            swagger_js_url=static(request, "swagger-ui-bundle.js"),
            swagger_css_url=static(request, "swagger-ui.css"),
            swagger_favicon_url=static(request, "favicon-32x32.png"))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url(request), title=f"{SERVICE_NAME} - ReDoc",
            redoc_js_url=static(request, "redoc.standalone.js"),
            redoc_favicon_url=static(request, "favicon-32x32.png"), with_google_fonts=False)


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/", response_model=schemas.RootResponse, summary="Server metadata and endpoints")
    async def root() -> ORJSONResponse:
        endpoints = [
            {"path": route.path, "methods": sorted(route.methods or ()),
             "summary": getattr(route, "summary", None) or ""}
            for route in app.routes if getattr(route, "include_in_schema", False)
        ]
        return ORJSONResponse({"service": SERVICE_NAME, "version": __version__,
                               "status": "running", "endpoints": endpoints})

    @app.get("/health", response_model=schemas.HealthResponse, summary="Liveness check")
    async def health() -> ORJSONResponse:
        return ORJSONResponse({"status": "healthy"})

    @app.get("/model_info", response_model=schemas.ModelInfoResponse,
             summary="Model configuration")
    async def model_info(request: Request) -> ORJSONResponse:
        engine = request.app.state.engine
        config = engine.config
        name, sha = _checkpoint_info(engine)
        return ORJSONResponse({
            "latent_dim": config.latent_dims, "latent_ratio": config.latent_ratio,
            "n_gaussians": config.n_splats, "input_shape": list(engine.box_shape),
            "device": engine.device.type, "n_affinity": config.n_affinity,
            "n_free": config.n_free, "affinity_dims": config.affinity_dims,
            "checkpoint": name, "sha256": sha, "normalisation": "z-score"})


async def _parse(request: Request, options: type[BaseModel],
                 convert: Callable[[dict[str, Any]], np.ndarray],
                 array_field: str | None = None) -> tuple[Any, np.ndarray]:
    """JSON body -> (validated options, float32 volumes), parsed on a worker thread."""
    if not codecs.is_json_content_type(request.headers.get("content-type")):
        raise HTTPException(415, "Content-Type must be application/json")
    body = await request.body()

    def parse() -> tuple[Any, np.ndarray]:
        payload = (codecs.loads_object(body) if array_field is None
                   else codecs.loads_with_split_array(body, array_field))
        return options.model_validate(payload), convert(payload)

    return await run_in_threadpool(parse)


def _required(payload: dict[str, Any], field: str) -> Any:
    if field not in payload:
        raise InputError(f"{field} is required", field=field)
    return payload[field]


async def _respond(payload: dict[str, Any]) -> ORJSONResponse:
    return ORJSONResponse(await run_in_threadpool(codecs.dumps, payload))


def _splat_payload(splats, i: int) -> dict[str, Any]:
    return {"centers": splats.centres[i], "weights": splats.weights[i],
            "scales": splats.sigmas[i], "segment": splats.segment,
            "n_affinity": splats.n_affinity, "n_free": splats.n_free,
            "n_total": splats.n_affinity + splats.n_free}


def _add_volume_routes(app: FastAPI, settings: Settings) -> None:
    def box(request: Request) -> tuple[int, ...]:
        return tuple(request.app.state.engine.box_shape)

    def one_volume(request: Request) -> Callable[[dict[str, Any]], np.ndarray]:
        shape = box(request)
        return lambda payload: codecs.volume(_required(payload, "input_volume"),
                                             "input_volume", shape)

    def worker(request: Request) -> InferenceWorker:
        return request.app.state.worker

    @app.post("/reconstruct", response_model=schemas.ReconstructResponse,
              summary="Reconstruct a volume through the VAE", responses=_VOLUME_ERRORS,
              openapi_extra=_json_body(schemas.ReconstructRequest))
    async def reconstruct(request: Request) -> ORJSONResponse:
        opts, volume = await _parse(request, schemas.ReconstructOptions, one_volume(request))

        def run(engine):
            rec = engine.reconstruct(volume[None], use_predicted_pose=opts.use_predicted_pose,
                                     final_convolution=opts.use_final_convolution,
                                     segments=opts.use_segmented_decoder)
            return rec, engine.splats(volume[None]) if opts.return_splat_data else None

        rec, splats = await worker(request).submit(run)
        payload: dict[str, Any] = {"reconstruction": rec.volume[0],
                                   "input_shape": list(volume.shape),
                                   "reconstruction_shape": list(rec.volume.shape[1:])}
        if opts.return_embeddings:
            payload["embeddings"] = payload["embedding"] = rec.features.embedding[0]
        if opts.use_segmented_decoder:
            payload["segmented_outputs"] = {"affinity": rec.affinity[0], "free": rec.free[0]}
        if splats is not None:
            payload["splats"] = _splat_payload(splats, 0)
        return await _respond(payload)

    @app.post("/extract_features", response_model=schemas.FeaturesResponse,
              summary="Embedding, pose and global weight of a volume", responses=_VOLUME_ERRORS,
              openapi_extra=_json_body(schemas.FeaturesRequest))
    async def extract_features(request: Request) -> ORJSONResponse:
        opts, volume = await _parse(request, schemas.FeaturesOptions, one_volume(request))
        feats = await worker(request).submit(lambda engine: engine.features(volume[None]))
        payload: dict[str, Any] = {"embedding": feats.embedding[0],
                                   "embeddings": feats.embedding[0]}
        if opts.return_pose:
            payload["pose"] = feats.pose_quaternion[0]
            payload["pose_axis_angle"] = feats.pose_axis_angle[0]
        if opts.return_global_weight:
            payload["global_weight"] = float(feats.global_weight[0])
        if opts.return_variance:
            payload["log_variance"] = feats.log_var[0]
        payload["input_shape"] = list(volume.shape)
        payload["latent_dims"] = int(feats.embedding.shape[1])
        return await _respond(payload)

    @app.post("/extract_gaussian_splats", response_model=schemas.SplatsResponse,
              summary="Gaussian splats of a volume (voxels, z-y-x)", responses=_VOLUME_ERRORS,
              openapi_extra=_json_body(schemas.SplatsRequest))
    async def extract_gaussian_splats(request: Request) -> ORJSONResponse:
        opts, volume = await _parse(request, schemas.SplatsOptions, one_volume(request))
        splats = await worker(request).submit(
            lambda engine: engine.splats(volume[None], include_free=opts.include_free_segment))
        return await _respond({**_splat_payload(splats, 0), "input_shape": list(volume.shape)})

    @app.post("/batch_process", response_model=schemas.BatchResponse,
              summary="Process many volumes in batches", responses=_VOLUME_ERRORS,
              openapi_extra=_json_body(schemas.BatchRequest))
    async def batch_process(request: Request) -> ORJSONResponse:
        shape = box(request)
        opts, volumes = await _parse(
            request, schemas.BatchOptions,
            lambda payload: codecs.volumes(_required(payload, "input_volumes"),
                                           "input_volumes", shape, settings.max_volumes),
            array_field="input_volumes")
        want_splats = opts.operation == "splats"
        want_recon = opts.return_reconstructions and opts.operation in (None, "reconstruction")

        def run(engine) -> dict[str, np.ndarray]:
            parts: dict[str, list[np.ndarray]] = {}
            for start in range(0, len(volumes), opts.batch_size):
                chunk = volumes[start:start + opts.batch_size]
                out: dict[str, np.ndarray] = {}
                if want_recon:
                    rec = engine.reconstruct(chunk, use_predicted_pose=opts.use_predicted_pose,
                                             final_convolution=opts.use_final_convolution)
                    feats, out["reconstructions"] = rec.features, rec.volume
                elif want_splats:
                    splats = engine.splats(chunk)
                    feats = splats.features
                    out.update(centers=splats.centres, weights=splats.weights,
                               scales=splats.sigmas)
                else:
                    feats = engine.features(chunk)
                if opts.return_embeddings:
                    out["embeddings"] = feats.embedding
                if opts.return_poses:
                    out["poses"] = feats.pose_quaternion
                if opts.return_global_weights:
                    out["global_weights"] = feats.global_weight
                for key, value in out.items():
                    parts.setdefault(key, []).append(value)
            return {key: np.concatenate(value) for key, value in parts.items()}

        result = await worker(request).submit(run)
        return await _respond({**result, "n_volumes": len(volumes),
                               "num_processed": len(volumes), "input_shape": list(shape)})

    def statistics_of(value: Any, field: str) -> dict[str, Any]:
        array = codecs.numeric_array(value, field)
        if array.size == 0:
            raise InputError(f"{field} is empty: expected at least one number", field=field)
        data = array.astype(np.float64)
        return {"mean": float(data.mean()), "std": float(data.std()),
                "min": float(data.min()), "max": float(data.max()), "shape": list(array.shape)}

    @app.get("/statistics", response_model=schemas.StatisticsResponse,
             summary="Mean, std, min, max and shape of a small volume", responses=_ERRORS)
    async def statistics_get(
        volume: str | None = Query(None, description="URL-encoded JSON array of numbers, any "
                                   "shape. Large volumes: POST /statistics."),
        volume_data: str | None = Query(None, description="Alias of `volume`."),
    ) -> ORJSONResponse:
        field, text = ("volume", volume) if volume is not None else ("volume_data", volume_data)
        if text is None:
            raise InputError("query parameter volume (or volume_data) is required",
                             field="volume")
        value = codecs.loads_json(text.encode(), field)
        return ORJSONResponse(await run_in_threadpool(statistics_of, value, field))

    @app.post("/statistics", response_model=schemas.StatisticsResponse,
              summary="Statistics of a volume sent as a JSON body", responses=_VOLUME_ERRORS,
              openapi_extra=_json_body(schemas.StatisticsRequest))
    async def statistics_post(request: Request) -> ORJSONResponse:
        if not codecs.is_json_content_type(request.headers.get("content-type")):
            raise HTTPException(415, "Content-Type must be application/json")
        body = await request.body()

        def run() -> dict[str, Any]:
            payload = codecs.loads_object(body)
            field = "volume_data" if "volume" not in payload and "volume_data" in payload \
                else "volume"
            return statistics_of(_required(payload, field), field)

        return ORJSONResponse(await run_in_threadpool(run))
