"""Server settings in one place: built from CLI flags or ``CRYOLENS_*`` environment variables.

The CLI exports its flags as environment variables so that ``--reload`` and
``uvicorn cryolens.server.minimal_cryolens_server:app --workers N`` rebuild the same settings
in every process.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields

#: Named checkpoint served when none is given; shipped with the package, so no download.
DEFAULT_CHECKPOINT = "demo"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8023
#: Any origin may call, never with credentials. ``""`` turns CORS off.
DEFAULT_CORS = "*"
DEFAULT_DEVICE = "auto"
DEFAULT_LOG_LEVEL = "INFO"
#: Largest request body accepted (bytes); a 64-volume JSON batch is ~150 MB.
DEFAULT_MAX_BODY_BYTES = 256 * 1024**2
#: Most volumes one /batch_process request may carry.
DEFAULT_MAX_VOLUMES = 256
#: Inference jobs that may wait for the worker before new ones get 503.
DEFAULT_QUEUE_SIZE = 16
#: Seconds a client is told to wait (``Retry-After``) when the queue is full.
DEFAULT_RETRY_AFTER_S = 5
#: Volumes per engine pass in /batch_process when the request does not say.
DEFAULT_BATCH_SIZE = 32
#: Most particles the worker gathers from waiting requests into one engine call.
DEFAULT_MAX_BATCH_SIZE = 32
#: Milliseconds the worker waits for more requests of the same kind before running a batch.
DEFAULT_BATCH_WAIT_MS = 2
#: Seconds a request may wait for the model (queue and load) before it is answered 504.
DEFAULT_REQUEST_TIMEOUT_S = 60
#: Bytes of request bodies being read and parsed at once, all requests together.
DEFAULT_MAX_PARSE_BYTES = 512 * 1024**2
#: Seconds a request waits for room in that parse budget before it is answered 503.
DEFAULT_PARSE_WAIT_S = 2.0
#: Seconds without a body chunk before a slow upload is answered 408 and closed.
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Seconds a connection has to send complete request headers (slow or silent ones are closed).
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Seconds an idle keep-alive connection stays open.
DEFAULT_KEEP_ALIVE_S = 5
#: Open connections (and tasks) beyond which uvicorn answers 503 at once.
DEFAULT_MAX_CONNECTIONS = 256
#: Largest incomplete HTTP event (request line plus headers) h11 buffers, in bytes.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: Seconds SIGTERM waits for requests in flight before closing their connections.
DEFAULT_DRAIN_TIMEOUT_S = 30

DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
ENV_PREFIX = "CRYOLENS_"


@dataclass(frozen=True)
class Settings:
    """Everything a server process needs to know before it starts."""

    checkpoint: str = DEFAULT_CHECKPOINT
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    cors: str = DEFAULT_CORS
    device: str = DEFAULT_DEVICE
    log_level: str = DEFAULT_LOG_LEVEL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_volumes: int = DEFAULT_MAX_VOLUMES
    queue_size: int = DEFAULT_QUEUE_SIZE
    retry_after_s: int = DEFAULT_RETRY_AFTER_S
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_ms: int = DEFAULT_BATCH_WAIT_MS
    request_timeout_s: int = DEFAULT_REQUEST_TIMEOUT_S
    # -- shared-node hygiene (issue #9) ---------------------------------------------------
    max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES  # body bytes parsed at once, server-wide
    parse_wait_s: float = DEFAULT_PARSE_WAIT_S  # wait for parse room before a 503
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # silence mid-upload before a 408
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # to send complete request headers
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S  # idle keep-alive connection lifetime
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # uvicorn limit_concurrency
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # h11_max_incomplete_event_size
    drain_timeout_s: int = DEFAULT_DRAIN_TIMEOUT_S  # uvicorn timeout_graceful_shutdown

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_level", self.log_level.upper())
        object.__setattr__(self, "device", self.device.lower())
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        for name in ("port", "max_body_bytes", "max_volumes", "queue_size", "retry_after_s",
                     "max_batch_size", "request_timeout_s", "max_parse_bytes",
                     "body_timeout_s", "header_timeout_s", "keep_alive_s", "max_connections", "max_header_bytes",
                     "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.parse_wait_s < 0:
            raise ValueError(f"parse_wait_s must be 0 or more, got {self.parse_wait_s}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")

    @property
    def cors_origins(self) -> list[str]:
        """Allowed origins; empty means no CORS middleware at all."""
        return [origin.strip() for origin in self.cors.split(",") if origin.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``CRYOLENS_<FIELD>`` (e.g. ``CRYOLENS_CHECKPOINT``); unset means the default."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.type in ("int", "float"):
                try:
                    values[f.name] = int(raw) if f.type == "int" else float(raw)
                except ValueError:
                    kind = "an integer" if f.type == "int" else "a number"
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be {kind}, "
                                     f"got {raw!r}") from None
            else:
                values[f.name] = raw
        return cls(**values)

    def export_env(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write every field as ``CRYOLENS_<FIELD>`` so child processes rebuild these settings."""
        environ = os.environ if environ is None else environ
        for f in fields(self):
            environ[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
