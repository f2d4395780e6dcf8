"""The same REST API on a Ray cluster: a Ray Serve application around the FastAPI app.

Each replica builds its app with :func:`cryolens.server.app.create_app` from
:class:`~cryolens.server.settings.Settings`, exactly as ``cryolens-server`` does: the driver
turns its settings into ``CRYOLENS_*`` variables, Ray hands them to every replica through the
deployment's runtime environment, and the replica reads them back with ``Settings.from_env()``.
Routes, middleware, error mapping, the binary formats, ``/docs`` and the lifespan (the
inference worker that loads the model and batches requests) are those of the plain server.

Three ways in:

- ``cryolens serve --ray [--replicas N] [--replica-cpus C] [--replica-gpus G] [--address A]``
  (every option of ``cryolens serve`` too); without ``--address`` a local cluster is started
  and stopped on exit;
- ``serve run cryolens.server.ray:app``: ``app`` is built on first access from ``CRYOLENS_*``
  (settings) and ``CRYOLENS_RAY_*`` (the :class:`RayOptions` fields, e.g.
  ``CRYOLENS_RAY_REPLICAS=2``); the same import path serves a KubeRay ``RayService``
  (``deploy/rayservice.yaml``);
- :func:`build` from Python.

Ray is an optional dependency (``pip install 'cryolens-server[ray]'``); importing this module
does not import it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields

from cryolens.server.settings import Settings, env_name

APP_NAME = "cryolens"
DEPLOYMENT_NAME = "CryoLens"
INSTALL_RAY = "pip install 'cryolens-server[ray]'"
#: Response headers naming the replica and the node that answered (for checks and debugging).
REPLICA_HEADER = "X-CryoLens-Replica"
NODE_HEADER = "X-CryoLens-Node"
RAY_ENV_PREFIX = "CRYOLENS_RAY_"
_REQUEST_ID = b"x-request-id"


@dataclass(frozen=True)
class RayOptions:
    """How the deployment is placed and scaled; each field is also ``CRYOLENS_RAY_<FIELD>``."""

    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    #: Autoscaling between ``min_replicas`` and ``max_replicas`` when ``max_replicas`` is above
    #: ``replicas`` (which is then the initial count); ``None`` = a fixed ``replicas``.
    max_replicas: int | None = None
    min_replicas: int = 1
    target_ongoing_requests: float = 8.0
    #: Requests a replica takes at once; ``None`` = the settings' queue plus one batch. Serve's
    #: default (5) would cap the batches the inference worker can gather.
    max_ongoing_requests: int | None = None
    max_replicas_per_node: int | None = None
    #: Where Serve runs HTTP proxies: EveryNode (Serve's default), HeadOnly or Disabled.
    proxy_location: str = "EveryNode"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica CPUs and GPUs must be 0 or more")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least replicas "
                             f"({self.replicas})")

    @classmethod
    def from_env(cls, environ=None) -> RayOptions:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(RAY_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = str(f.type)
            convert = int if kind.startswith("int") else float if kind.startswith("float") \
                else str
            values[f.name] = convert(raw)
        return cls(**values)

    def threads(self) -> int:
        """Torch CPU threads per replica: its whole CPUs, at least one."""
        return max(1, int(self.replica_cpus))

    def ongoing(self, settings: Settings) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return settings.queue_size + settings.max_batch_size


def settings_env(settings: Settings, options: RayOptions | None = None) -> dict[str, str]:
    """``CRYOLENS_*`` for every setting (what each replica rebuilds its Settings from), and the
    CPU thread count the replica's PyTorch should use."""
    env = {env_name(f): str(getattr(settings, f.name)) for f in fields(Settings)}
    if options is not None:
        env["OMP_NUM_THREADS"] = str(options.threads())
        env[RAY_ENV_PREFIX + "THREADS"] = str(options.threads())
    return env


def replica_app():
    """The FastAPI app of one replica, built from ``CRYOLENS_*`` in its runtime environment,
    plus a header that names the replica and its node."""
    threads = os.environ.get(RAY_ENV_PREFIX + "THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from cryolens.server.app import create_app

    app = create_app(Settings.from_env())
    app.add_middleware(ReplicaHeaders)
    return app


class ReplicaHeaders:
    """ASGI middleware: add :data:`REPLICA_HEADER` and :data:`NODE_HEADER` to every answer."""

    def __init__(self, app) -> None:
        self.app = app
        self._headers: list[tuple[bytes, bytes]] | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            try:
                import ray
                from ray import serve

                replica = serve.get_replica_context().replica_id.unique_id
                node = ray.get_runtime_context().get_node_id()
            except Exception:  # noqa: BLE001 - outside a replica (tests): no headers
                replica, node = "", ""
            self._headers = [(REPLICA_HEADER.lower().encode(), replica.encode()),
                             (NODE_HEADER.lower().encode(), node.encode())] if replica else []
        return self._headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers()

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start" and extra:
                # Serve's proxy echoes X-Request-ID itself (the same id, which it passed in):
                # the app's copy would make it appear twice.
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != _REQUEST_ID]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def deployment_options(settings: Settings, options: RayOptions) -> dict:
    """Keyword arguments of ``serve.deployment(...).options``: resources, concurrency, scaling
    and the runtime environment that carries the settings."""
    actor = {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus,
             "runtime_env": {"env_vars": settings_env(settings, options)}}
    out: dict = {"name": DEPLOYMENT_NAME, "ray_actor_options": actor,
                 "max_ongoing_requests": options.ongoing(settings),
                 # a replica drains like the plain server does on SIGTERM
                 "graceful_shutdown_timeout_s": float(settings.drain_timeout_s),
                 "health_check_period_s": 10.0,
                 # per-request lines only where uvicorn would print them (INFO, DEBUG)
                 "logging_config": {"log_level": settings.log_level,
                                    "enable_access_log": settings.log_level in ("INFO",
                                                                                "DEBUG")}}
    if options.max_replicas_per_node is not None:
        out["max_replicas_per_node"] = options.max_replicas_per_node
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        out["autoscaling_config"] = {
            "min_replicas": min(options.min_replicas, options.replicas),
            "initial_replicas": options.replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests}
    else:
        out["num_replicas"] = options.replicas
    return out


def build(settings: Settings | None = None, options: RayOptions | None = None):
    """The bound Serve application (``serve.run(build(...))``)."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"Ray Serve is not installed: {INSTALL_RAY}") from exc
    settings = settings or Settings.from_env()
    options = options or RayOptions.from_env()

    @serve.deployment
    @serve.ingress(replica_app)
    class CryoLens:
        """One replica: the FastAPI app of :func:`replica_app` (model, worker, routes)."""

    return CryoLens.options(**deployment_options(settings, options)).bind()


def __getattr__(name: str):
    """``app`` for ``serve run cryolens.server.ray:app``, built on first access."""
    if name == "app":
        built = build(Settings.from_env(), RayOptions.from_env())
        globals()["app"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the command line: cryolens serve --ray -----------------------------------------------------
@dataclass
class RunningApp:
    """What :func:`start` started; :meth:`stop` undoes exactly that."""

    url: str
    owns_cluster: bool
    stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        import ray
        from ray import serve

        try:
            if self.owns_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if self.owns_cluster:
                ray.shutdown()


def start(settings: Settings, options: RayOptions, address: str | None = None, *,
          num_cpus: int | None = None, temp_dir: str | None = None) -> RunningApp:
    """Connect to the cluster at ``address`` (or start a local one), start Serve's HTTP proxy
    on the settings' host and port, deploy the app and wait until it is ready."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve: {INSTALL_RAY}") from exc
    owns = False
    if not ray.is_initialized():
        init: dict = {"include_dashboard": False, "log_to_driver": True}
        if address:
            init["address"] = address
        else:
            owns = True
            init["num_cpus"] = num_cpus
            if temp_dir:
                init["_temp_dir"] = temp_dir
        ray.init(**init)
    running = RunningApp(url=f"http://{_client_host(settings.host)}:{settings.port}",
                         owns_cluster=owns)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port,
                                  "keep_alive_timeout_s": settings.keep_alive_s},
                    proxy_location=options.proxy_location)
        serve.run(build(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
        wait_ready(running.url, settings.request_timeout_s + 120)
    except BaseException:
        running.stop()
        raise
    return running


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def wait_ready(url: str, timeout_s: float) -> None:
    """Until ``/ready`` answers 200 through Serve (every replica is up before serve.run
    returns; this waits for the model to load)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray Serve app at {url} was not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


def serve_forever(settings: Settings, options: RayOptions, address: str | None,
                  prog: str = "cryolens serve") -> int:
    """``cryolens serve --ray``: start, print where, serve until SIGINT/SIGTERM, stop."""
    done = threading.Event()
    running = start(settings, options, address)
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(signum, lambda *_: done.set())
    where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
    print(f"{prog}: serving {settings.checkpoint!r} on {running.url} through Ray Serve on "
          f"{where} ({options.replicas} replica(s), {options.replica_cpus:g} CPU and "
          f"{options.replica_gpus:g} GPU each); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        done.wait()
    finally:
        running.stop()
    return 0


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "NODE_HEADER", "REPLICA_HEADER", "RayOptions",
           "build", "deployment_options", "replica_app", "serve_forever", "settings_env",
           "start"]
