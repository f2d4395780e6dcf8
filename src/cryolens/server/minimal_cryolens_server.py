"""The seed's server entry point: ``python -m cryolens.server.minimal_cryolens_server`` (also
``cryolens-server``) and a module-level ``app`` for ``uvicorn ...:app --workers N``.

The CLI exports its flags as ``CRYOLENS_*`` variables and hands uvicorn the app as an import
string, so ``--reload`` and multi-worker processes build the same app from the environment.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryolens.server.app import create_app, exit_zero_on_sigterm
from cryolens.server.protocol import IMPORT_STRING as HEADER_TIMEOUT_PROTOCOL
from cryolens.server.settings import DEVICES, LOG_LEVELS, Settings

APP_IMPORT_STRING = "cryolens.server.minimal_cryolens_server:app"
DEFAULT_WORKERS = 1



def __getattr__(name: str):
    """``app``, built from ``CRYOLENS_*`` variables on first use (``uvicorn ...:app``), never
    at import: a bad variable must not break ``--help``."""
    if name == "app":
        globals()["app"] = built = create_app(Settings.from_env())
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryolens-server", description="Serve a CryoLens model over HTTP (FastAPI).")
    parser.add_argument("--checkpoint", "-c", default=defaults.checkpoint,
                        help="checkpoint name (demo, v001), http(s) URL or local file "
                             f"(default: {defaults.checkpoint})")
    parser.add_argument("--host", default=defaults.host,
                        help=f"address to bind (default: {defaults.host})")
    parser.add_argument("--port", "-p", type=int, default=defaults.port,
                        help=f"port to bind (default: {defaults.port})")
    parser.add_argument("--cors", default=defaults.cors,
                        help="allowed origins, comma-separated, or * for any (never with "
                             "credentials); an empty string turns CORS off "
                             f"(default: {defaults.cors!r})")
    parser.add_argument("--device", type=str.lower, choices=DEVICES, default=defaults.device,
                        help=f"inference device (default: {defaults.device})")
    parser.add_argument("--reload", action="store_true",
                        help="restart when the package's source changes (development)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=defaults.log_level,
                        help=f"logging level, any case (default: {defaults.log_level})")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="server processes, each with its own model (default: 1)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"largest request body (default: {defaults.max_body_bytes})")
    parser.add_argument("--max-volumes", type=int, default=defaults.max_volumes,
                        help=f"most volumes per /batch_process (default: {defaults.max_volumes})")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help="inference jobs that may wait before 503 "
                             f"(default: {defaults.queue_size})")
    parser.add_argument("--list-versions", action="store_true",
                        help="list the named checkpoints and exit")
    return parser


def list_versions() -> None:
    from cryolens.checkpoints import list_checkpoints

    for row in list_checkpoints():
        where = "available here" if row["available"] else "not available here yet"
        print(f"{row['name']} : {row['description']} ({where})")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        defaults = Settings.from_env()
    except ValueError as exc:
        print(f"cryolens-server: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.list_versions:
        list_versions()
        return 0
    try:
        settings = replace(defaults, checkpoint=args.checkpoint, host=args.host, port=args.port,
                            cors=args.cors, device=args.device, log_level=args.log_level,
                            max_body_bytes=args.max_body_bytes, max_volumes=args.max_volumes,
                            queue_size=args.queue_size, retry_after_s=defaults.retry_after_s)
    except ValueError as exc:
        parser.error(str(exc))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    settings.export_env()

    import uvicorn

    exit_zero_on_sigterm()
    uvicorn.run(APP_IMPORT_STRING, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), reload=args.reload,
                reload_dirs=[str(Path(__file__).resolve().parents[1])] if args.reload else None,
                workers=None if args.reload else args.workers,
                timeout_keep_alive=settings.keep_alive_s,
                limit_concurrency=settings.max_connections,
                h11_max_incomplete_event_size=settings.max_header_bytes,
                timeout_graceful_shutdown=settings.drain_timeout_s, http=HEADER_TIMEOUT_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
