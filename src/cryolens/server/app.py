"""The HTTP application: ``create_app(settings)`` puts the parts together.

Routes (``routes.py``), request bodies (``bodies.py``), responses (``responses.py``), error
mapping (``handlers.py``), middleware (``middleware.py``), metrics and offline docs each live in
their own module. This one only wires them and runs the lifespan: the inference worker loads
the model on its own thread, so ``/health`` answers at once and ``/ready`` once it is warm.
This layer never imports torch.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from cryolens import __version__, heap
from cryolens.errors import CryoLensError
from cryolens.server import docs, handlers, routes
from cryolens.server.budget import ParseBudget
from cryolens.server.metrics import Metrics
from cryolens.server.middleware import (
    BodyLimitMiddleware,
    ErrorMiddleware,
    HeadAsGet,
    RepeatFilter,
    RequestContextMiddleware,
    RequestIdFilter,
)
from cryolens.server.responses import ORJSONResponse
from cryolens.server.settings import Settings
from cryolens.server.worker import InferenceWorker

logger = logging.getLogger("cryolens.server")

SERVICE_NAME = "CryoLens VAE Server"
#: Exit status when the model cannot load: uvicorn's own "startup failed", which also stops a
#: ``--workers N`` supervisor instead of restarting the child forever.
STARTUP_FAILURE_EXIT = 3
#: Exit status when the watchdog finds the inference thread gone or stuck (EX_SOFTWARE): the
#: supervisor (systemd, Kubernetes, uvicorn's --workers) starts a fresh process.
WATCHDOG_EXIT = 70
#: Seconds between two looks of the watchdog at the inference worker.
WATCH_EVERY_S = 1.0
#: Seconds a faulty process answers 503 on /health and /ready before it exits, so that load
#: balancers and probes see why.
FAULT_GRACE_S = 5.0
#: Most seconds shutdown waits, after the drain, for a batch still running; then the batch is
#: abandoned (its requests were answered 503 at the drain deadline) and the process exits 0.
ABANDON_AFTER_S = 10.0


def exit_now(status: int) -> None:
    """End the process at once with ``status``: logs and stdio flushed, no interpreter
    shutdown. For an inference thread that cannot be joined (stuck, or abandoned mid-batch):
    finalising the interpreter under a running PyTorch thread aborts the process ("terminate
    called without an active exception", SIGABRT)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def create_app(settings: Settings | None = None, *, engine=None, warm_up: bool | None = None,
               exit_process: Callable[[int], None] = exit_now) -> FastAPI:
    """Build the server from ``settings`` (default: ``CRYOLENS_*`` variables). ``engine`` (an
    already loaded :class:`cryolens.engine.Engine`) skips loading the checkpoint named in the
    settings; tests and embedding applications use it. ``warm_up``: run each operation once
    before /ready (default: only for an engine loaded here). ``exit_process(status)`` is
    called when the process must end without the usual shutdown (the watchdog, a batch
    abandoned at shutdown); tests pass their own. Nothing is loaded until the app starts."""
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level)
        if heap.tune():  # batches of big arrays without page faults (cryolens/heap.py)
            logger.debug("glibc heap thresholds set: mmap %d, trim %d bytes",
                         heap.MMAP_THRESHOLD, heap.TRIM_THRESHOLD)
        worker = InferenceWorker(
            (lambda: engine) if engine is not None else (lambda: load_engine(settings)),
            queue_size=settings.queue_size, max_batch=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000, timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            warm_up=engine is None if warm_up is None else warm_up, events=metrics,
            nice=settings.model_nice, stall_timeout_s=settings.stall_timeout_s)
        app.state.worker = worker
        app.state.codec_pool = ThreadPoolExecutor(settings.codec_threads,
                                                  thread_name_prefix="cryolens-codec")
        worker.start(on_failure=startup_failed(settings))
        watchdog = asyncio.ensure_future(watch(worker, exit_process))
        try:
            yield
        finally:
            watchdog.cancel()
            # joined off the event loop: requests given up at the drain deadline are still
            # writing their 503s on it
            grace = min(settings.drain_timeout_s, ABANDON_AFTER_S)
            finished = await asyncio.get_running_loop().run_in_executor(
                None, worker.stop, grace)
            app.state.codec_pool.shutdown(wait=False, cancel_futures=True)
            if not finished:
                logger.warning("the running batch did not finish within %g s after the "
                               "drain: abandoned; exiting", grace)
                await asyncio.sleep(0.1)  # the last answers leave
                exit_process(0)

    app = FastAPI(title=SERVICE_NAME, version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, default_response_class=ORJSONResponse,
                  description="CryoLens particle VAE over HTTP: reconstructions, embeddings, "
                              "poses and Gaussian splats of 48^3 cryo-ET particles. Volumes "
                              "as JSON nested lists, .npy or MRC; answers as JSON or .npz.")
    app.state.metrics = metrics
    app.state.parse_budget = ParseBudget(settings.max_parse_bytes, settings.parse_wait_s,
                                         on_refusal=metrics.busy_parse.inc)
    handlers.install(app, settings.retry_after_s)
    docs.add_routes(app)
    routes.add_routes(app, settings)
    app.add_middleware(HeadAsGet)  # innermost first
    app.add_middleware(ErrorMiddleware, metrics=metrics, retry_after_s=settings.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s, min_rate=settings.min_body_rate)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_credentials=False, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


async def watch(worker: InferenceWorker, exit_process: Callable[[int], None]) -> None:
    """The watchdog: once the worker reports a fault (its thread gone, or stuck in one batch),
    waiting requests get 503, /health and /ready answer 503 for :data:`FAULT_GRACE_S`, and
    the process exits :data:`WATCHDOG_EXIT` for its supervisor to restart it."""
    while (reason := worker.fault()) is None:
        await asyncio.sleep(WATCH_EVERY_S)
    logger.error("%s; /health answers 503 and the process exits with status %d for its "
                 "supervisor to restart it", reason, WATCHDOG_EXIT)
    worker.stop(timeout=0, reason=f"the server is restarting ({reason}); retry shortly")
    await asyncio.sleep(FAULT_GRACE_S)
    exit_process(WATCHDOG_EXIT)


def load_engine(settings: Settings):
    """The engine for ``settings``; logs the checkpoint's name, sha256 and device once loaded."""
    from cryolens.engine import Engine

    engine = Engine.from_checkpoint(settings.checkpoint, device=settings.device)
    info = getattr(engine, "checkpoint", None)
    logger.info("serving checkpoint %s (sha256 %s) on %s",
                getattr(info, "display_name", "in-memory"), getattr(info, "sha256", "-"),
                engine.device)
    return engine


def startup_failed(settings: Settings):
    """What the worker does when the model cannot load: one line on stderr (no traceback)
    and the process ends, as uvicorn does when its own startup fails."""
    def fail(exc: BaseException) -> None:
        sys.stderr.write(startup_failure_line(settings, exc))
        sys.stderr.flush()
        os._exit(STARTUP_FAILURE_EXIT)

    return fail


def startup_failure_line(settings: Settings, exc: BaseException) -> str:
    """The one line that says why the model cannot load (no traceback)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = "" if isinstance(exc, CryoLensError) else f"{type(exc).__name__}: "
    return (f"cryolens-server: cannot load checkpoint {settings.checkpoint!r} on device "
            f"{settings.device!r}: {kind}{reason}\n")


def exit_zero_on_sigterm() -> None:
    """uvicorn (>= 0.29) re-raises the SIGTERM it handled once it has shut down, so the process
    would die of the signal (status 143) after a clean drain. A no-op handler installed before
    ``uvicorn.run`` is what uvicorn restores and re-raises into: the process then ends with
    status 0. Only for the process that calls ``uvicorn.run`` itself (our CLI)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def configure_logging(level: str) -> None:
    """The package's log lines carry the request id; uvicorn's access lines get it too."""
    package_logger = logging.getLogger("cryolens")
    package_logger.setLevel(level)
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(
            "%(levelname)s:     %(name)s: [%(request_id)s] %(message)s"))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    for name in ("uvicorn.error", "asyncio"):  # accept() floods (EMFILE): once a minute
        flooded = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in flooded.filters):
            flooded.addFilter(RepeatFilter())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _AccessRequestId) for f in access.filters):
        access.addFilter(_AccessRequestId())


class _AccessRequestId(RequestIdFilter):
    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        if record.request_id != "-" and isinstance(record.msg, str):
            record.msg = f"[{record.request_id}] {record.msg}"
        return True
