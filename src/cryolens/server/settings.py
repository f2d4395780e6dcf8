"""Server settings in one place: built from CLI flags or ``CRYOLENS_*`` environment variables.

Each field of :class:`Settings` is one setting, declared once. From the field the server gets

- the environment variable ``CRYOLENS_<FIELD NAME IN CAPITALS>`` (read by
  :meth:`Settings.from_env`),
- the command-line flag ``--<field-name-with-dashes>`` of ``cryolens-server`` and
  ``cryolens serve``,
- the flag's help text, followed by the default in effect.

To add a setting, add a field with a default and a ``metadata`` dict::

    batch_size: int = field(default=32, metadata={"help": "volumes per engine pass"})

Keys of ``metadata`` (all optional except ``help``):

``help``
    one line for ``--help``; the default is appended automatically.
``flags``
    the option strings, when they differ from ``--field-name`` (e.g. ``("--port", "-p")``).
``type``
    a callable that turns the command-line string into the value (``int``, ``float`` and ``str``
    fields need none; it is used for the environment variable too).
``choices``
    the values the flag accepts.

Validation that concerns several fields, or that a flag's ``type`` cannot express, belongs in
``__post_init__`` so that the environment and the command line are checked the same way.

The CLI exports its settings as environment variables (:meth:`Settings.export_env`) when it
starts more than one process, so that ``--reload`` and ``--workers N`` rebuild the same settings
in every process, exactly as ``uvicorn cryolens.server.minimal_cryolens_server:app --workers N``
does from variables set by hand.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import Field, dataclass, field, fields

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
#: Most milliseconds a batch waits for requests still being read (none arriving: no wait).
DEFAULT_BATCH_WAIT_MS = 10
#: Scheduling steps (nice) the model's threads run below the event loop (Linux): under load
#: the loop, which holds the GIL while it reads requests and writes answers, is then not
#: preempted by them. On 2 cores, 16 clients against 0: 10 gave +3-30 % (4 runs), 5 and 19 less.
DEFAULT_MODEL_NICE = 10
#: Seconds a request may wait for the model (queue and load) before it is answered 504.
DEFAULT_REQUEST_TIMEOUT_S = 60
#: Threads that parse large bodies and write large answers (parsing JSON holds the GIL:
#: more threads only queue for it, and delay the event loop's turn).
DEFAULT_CODEC_THREADS = 1
#: Bytes of request bodies being read and parsed at once, all requests together.
DEFAULT_MAX_PARSE_BYTES = 512 * 1024**2
#: Seconds a request waits for room in that parse budget before it is answered 503.
DEFAULT_PARSE_WAIT_S = 2.0
#: Seconds without a body chunk before a slow upload is answered 408 and closed.
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Bytes per second an incomplete upload must bring, over each body timeout (512 kbit/s):
#: a slower one is answered 408, so a trickle cannot hold the parse budget.
DEFAULT_MIN_BODY_RATE = 64 * 1024
#: Seconds a connection has to send complete request headers (slow or silent ones are closed).
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Seconds an idle keep-alive connection stays open.
DEFAULT_KEEP_ALIVE_S = 5
#: Open connections (and tasks) beyond which uvicorn answers 503 at once.
DEFAULT_MAX_CONNECTIONS = 256
#: Largest request line plus headers, in bytes, however they arrive (431 beyond it).
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: Seconds SIGTERM waits for requests in flight before closing their connections.
DEFAULT_DRAIN_TIMEOUT_S = 30
#: Seconds one batch may run before the inference thread counts as stuck (the server then
#: answers 503 and exits 70 for its supervisor to restart it): far beyond any real batch.
DEFAULT_STALL_TIMEOUT_S = 600.0
#: Seconds an answer may sit unread: while the client takes less than --min-send-rate bytes
#: per second of it over this long, the connection is closed and the answer freed.
DEFAULT_SEND_TIMEOUT_S = 30.0
#: Bytes per second a client must read of an answer it is sent (512 kbit/s, as for uploads).
DEFAULT_MIN_SEND_RATE = 64 * 1024

#: Accepted devices; ``cuda:N`` (N = 0, 1, ...) picks one GPU of several.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
ENV_PREFIX = "CRYOLENS_"


def parse_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, any case; anything else is a ValueError."""
    name = str(value).strip().lower()
    if name in ("auto", "cpu", "cuda"):
        return name
    prefix, _, index = name.partition(":")
    if prefix == "cuda" and index.isdigit():
        return f"cuda:{int(index)}"
    raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(DEVICES)})")


def parse_log_level(value: str) -> str:
    """A logging level name, any case; anything else is a ValueError."""
    name = str(value).strip().upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(LOG_LEVELS)}, "
                         "any case)")
    return name


def field_type(f: Field):
    """The callable that turns a flag's or a variable's text into this field's value."""
    if "type" in f.metadata:
        return f.metadata["type"]
    return {"int": int, "float": float}.get(str(f.type), str)


def field_flags(f: Field) -> tuple[str, ...]:
    """The field's option strings: ``metadata["flags"]`` or ``--field-name``."""
    return tuple(f.metadata.get("flags", ("--" + f.name.replace("_", "-"),)))


def env_name(f: Field) -> str:
    return ENV_PREFIX + f.name.upper()


@dataclass(frozen=True)
class Settings:
    """Everything a server process needs to know before it starts."""

    checkpoint: str = field(default=DEFAULT_CHECKPOINT, metadata={
        "flags": ("--checkpoint", "-c"),
        "help": "checkpoint: a name (demo, v001), an http(s) URL or a local file "
                "(.pt, .ckpt, .safetensors)"})
    host: str = field(default=DEFAULT_HOST, metadata={
        "help": "address to bind; 0.0.0.0 = every network interface, 127.0.0.1 = this "
                "machine only"})
    port: int = field(default=DEFAULT_PORT, metadata={
        "flags": ("--port", "-p"), "help": "port to bind"})
    cors: str = field(default=DEFAULT_CORS, metadata={
        "help": "origins that browsers may call from, comma-separated; * = any origin (never "
                "with credentials); an empty string turns CORS off"})
    device: str = field(default=DEFAULT_DEVICE, metadata={
        "type": parse_device,
        "help": "inference device: auto (CUDA when available), cpu, cuda, or cuda:N for the "
                "N-th GPU"})
    log_level: str = field(default=DEFAULT_LOG_LEVEL, metadata={
        "type": parse_log_level, "choices": LOG_LEVELS,
        "help": "logging level, any case; DEBUG also shows tracebacks"})
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "help": "largest request body in bytes; larger ones get 413"})
    max_volumes: int = field(default=DEFAULT_MAX_VOLUMES, metadata={
        "help": "most volumes per /batch_process request; more get 413"})
    queue_size: int = field(default=DEFAULT_QUEUE_SIZE, metadata={
        "help": "inference jobs that may wait; more get 503 with Retry-After"})
    retry_after_s: int = field(default=DEFAULT_RETRY_AFTER_S, metadata={
        "help": "seconds a client is told to wait (Retry-After) when the queue is full"})
    max_batch_size: int = field(default=DEFAULT_MAX_BATCH_SIZE, metadata={
        "help": "most particles gathered from waiting requests into one engine call"})
    batch_wait_ms: int = field(default=DEFAULT_BATCH_WAIT_MS, metadata={
        "help": "most milliseconds a batch waits for requests whose bodies are still being "
                "read (with none arriving it runs at once; 0: only what is already queued)"})
    model_nice: int = field(default=DEFAULT_MODEL_NICE, metadata={
        "help": "scheduling steps (nice, 0-19) the model's threads run below the event loop, "
                "so that under load they do not preempt it while it holds Python's GIL "
                "(Linux; 0: same priority)"})
    request_timeout_s: int = field(default=DEFAULT_REQUEST_TIMEOUT_S, metadata={
        "help": "seconds a request may wait for the model (queue, loading) before it is "
                "answered 504 and not run"})
    codec_threads: int = field(default=DEFAULT_CODEC_THREADS, metadata={
        "help": "threads that parse request bodies and write answers over 1 MiB (JSON "
                "parsing holds Python's GIL: more threads delay /health without adding "
                "throughput)"})
    # -- shared-node hygiene ----------------------------------------------------------------
    max_parse_bytes: int = field(default=DEFAULT_MAX_PARSE_BYTES, metadata={
        "help": "request-body bytes read and parsed at once, all requests together; beyond it "
                "requests wait --parse-wait-s, then get 503"})
    parse_wait_s: float = field(default=DEFAULT_PARSE_WAIT_S, metadata={
        "help": "seconds a request waits for room in the parse budget before a 503"})
    body_timeout_s: float = field(default=DEFAULT_BODY_TIMEOUT_S, metadata={
        "help": "seconds without a body chunk before a slow upload is answered 408 and closed"})
    min_body_rate: int = field(default=DEFAULT_MIN_BODY_RATE, metadata={
        "help": "bytes per second an unfinished upload must bring, over every --body-timeout-s "
                "seconds, or 408 and closed (a trickle would hold the parse budget; 0: any "
                "chunk will do)"})
    header_timeout_s: float = field(default=DEFAULT_HEADER_TIMEOUT_S, metadata={
        "help": "seconds a connection has to send complete request headers"})
    keep_alive_s: int = field(default=DEFAULT_KEEP_ALIVE_S, metadata={
        "help": "seconds an idle keep-alive connection stays open"})
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata={
        "help": "open connections beyond which new requests get 503 at once"})
    max_header_bytes: int = field(default=DEFAULT_MAX_HEADER_BYTES, metadata={
        "help": "largest request line plus headers, in bytes; larger ones get 431 and the "
                "connection is closed"})
    drain_timeout_s: int = field(default=DEFAULT_DRAIN_TIMEOUT_S, metadata={
        "help": "seconds SIGTERM waits for requests in flight; then requests still waiting "
                "get 503 with Retry-After, connections are closed and the process exits 0"})
    stall_timeout_s: float = field(default=DEFAULT_STALL_TIMEOUT_S, metadata={
        "help": "seconds one batch may run before the inference thread counts as stuck: "
                "/health and /ready then answer 503 and the process exits 70, for its "
                "supervisor to restart it"})
    send_timeout_s: float = field(default=DEFAULT_SEND_TIMEOUT_S, metadata={
        "help": "seconds over which a client must read at least --min-send-rate bytes/s of an "
                "answer it is sent; otherwise the connection is closed and the answer freed"})
    min_send_rate: int = field(default=DEFAULT_MIN_SEND_RATE, metadata={
        "help": "bytes per second a client must read of its answer, over every "
                "--send-timeout-s seconds (0: any progress will do)"})

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device", parse_device(self.device))
        except ValueError:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, "
                             f"got {self.device!r}") from None
        try:
            object.__setattr__(self, "log_level", parse_log_level(self.log_level))
        except ValueError:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}") from None
        for name in ("port", "max_body_bytes", "max_volumes", "queue_size", "retry_after_s",
                     "max_batch_size", "request_timeout_s", "codec_threads", "max_parse_bytes",
                     "body_timeout_s", "header_timeout_s", "keep_alive_s", "max_connections",
                     "max_header_bytes", "drain_timeout_s", "stall_timeout_s",
                     "send_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("min_body_rate", "min_send_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.parse_wait_s < 0:
            raise ValueError(f"parse_wait_s must be 0 or more, got {self.parse_wait_s}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")
        if not 0 <= self.model_nice <= 19:
            raise ValueError(f"model_nice must be from 0 to 19, got {self.model_nice}")

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
            raw = environ.get(env_name(f))
            if raw is None:
                continue
            convert = field_type(f)
            try:
                values[f.name] = convert(raw)
            except ValueError as exc:
                kind = {int: "an integer", float: "a number"}.get(convert)
                reason = f"must be {kind}, got {raw!r}" if kind else str(exc)
                raise ValueError(f"{env_name(f)} {reason}") from None
        return cls(**values)

    def export_env(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write every field as ``CRYOLENS_<FIELD>`` so child processes rebuild these settings."""
        environ = os.environ if environ is None else environ
        for f in fields(self):
            environ[env_name(f)] = str(getattr(self, f.name))
