"""The seed's server entry point: ``python -m cryolens.server.minimal_cryolens_server`` (also
``cryolens-server`` and ``cryolens serve``) and a module-level ``app`` for
``uvicorn cryolens.server.minimal_cryolens_server:app --workers N``.

The command line builds :class:`Settings` from its flags (whose defaults are the ``CRYOLENS_*``
variables) and, with one worker, hands uvicorn the app built from exactly those settings. With
``--workers N`` or ``--reload`` uvicorn starts new processes that import this module, so the CLI
first exports the settings as ``CRYOLENS_*`` variables and passes the import string.

``app`` is built lazily, on first access, from ``CRYOLENS_*``: importing this module (for
``--help``, or to call :func:`main`) never builds an app nor reads the environment.
"""
from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from cryolens.cliutil import ArgumentParser, fail
from cryolens.server import protocol
from cryolens.server.app import (
    STARTUP_FAILURE_EXIT,
    configure_logging,
    create_app,
    exit_zero_on_sigterm,
    load_engine,
    startup_failure_line,
)
from cryolens.server.settings import Settings, field_flags, field_type

APP_IMPORT_STRING = "cryolens.server.minimal_cryolens_server:app"
PROG = "cryolens-server"
DEFAULT_WORKERS = 1
#: Exit status when the port is taken or cannot be bound (a model that cannot load exits 3).
BIND_FAILURE_EXIT = 1


def __getattr__(name: str):
    """Build ``app`` from ``CRYOLENS_*`` on first access, once; the model loads at startup."""
    if name == "app":
        built = create_app(Settings.from_env())
        globals()["app"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _argparse_type(convert):
    """Wrap a converter so that its ValueError message reaches the user as is."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            if convert in (int, float):
                kind = "an integer" if convert is int else "a number"
                raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def build_parser(defaults: Settings, prog: str = PROG) -> argparse.ArgumentParser:
    """One option per :class:`Settings` field (see settings.py), plus the process options."""
    parser = ArgumentParser(
        prog=prog,
        description="Serve a CryoLens model over HTTP (FastAPI).\n\n"
                    "Every setting below can also be given as an environment variable "
                    "CRYOLENS_<NAME>\n(e.g. CRYOLENS_CHECKPOINT, CRYOLENS_MAX_VOLUMES); a flag "
                    "wins over the variable,\nand the defaults shown already include the "
                    "variables that are set.",
        epilog="examples:\n"
               f"  {prog} --checkpoint demo --port 8023\n"
               f"  {prog} -c /models/my_model.ckpt --device cuda:1 --host 127.0.0.1\n"
               f"  {prog} --list-versions")
    for f in fields(Settings):
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(*field_flags(f), dest=f.name, default=getattr(defaults, f.name),
                            type=_argparse_type(field_type(f)), help=f.metadata["help"],
                            **extra)
    parser.add_argument("--reload", action="store_true",
                        help="restart when the package's source changes (development)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="server processes, each loading its own copy of the model")
    parser.add_argument("--list-versions", action="store_true",
                        help="list the named checkpoints and exit")
    ray = parser.add_argument_group(
        "Ray Serve (with --ray; pip install 'cryolens-server[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: on a new local Ray cluster, stopped on exit, "
                          "or on the one at --address")
    for flags, kind, text in RAY_FLAGS:
        ray.add_argument(*flags, type=kind, default=None, help=text)
    return parser


#: Options that only --ray takes: (flags, type, help); None = the RayOptions default.
RAY_FLAGS = (
    (("--replicas",), int, "replicas of the app, each with its own model (default: 1)"),
    (("--replica-cpus",), float, "CPUs per replica; also its torch threads (default: 1)"),
    (("--replica-gpus",), float, "GPUs per replica, fractions allowed (default: 0)"),
    (("--max-replicas",), int, "autoscale from --replicas up to this many (default: fixed)"),
    (("--address",), str, "a Ray cluster to join: auto, or ray://head:10001 (default: new)"),
)


def list_versions() -> None:
    from cryolens.checkpoints import list_checkpoints

    for row in list_checkpoints():
        where = "available here" if row["available"] else "not available here yet"
        print(f"{row['name']} : {row['description']} ({where})")


def check_port_free(host: str, port: int) -> str | None:
    """Whether another program listens on ``host:port``: checked before the model loads
    (uvicorn binds only after startup). Other bind errors are left to uvicorn to report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (f"port {port} is already in use on {host}; stop the program that uses it "
                    "or choose another port with --port N (make serve PORT=N)")
    return None


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    try:
        defaults, env_error = Settings.from_env(), None
    except ValueError as exc:  # reported after parsing, so that --help still works
        defaults, env_error = Settings(), str(exc)
    parser = build_parser(defaults, prog)
    args = parser.parse_args(argv)
    if env_error:
        parser.exit(2, f"{prog}: {env_error}\n")
    if args.list_versions:
        list_versions()
        return 0
    try:
        settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    except ValueError as exc:
        parser.error(str(exc))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    given = [flags[0] for flags, _, _ in RAY_FLAGS
             if getattr(args, flags[0][2:].replace("-", "_")) is not None]
    if given and not args.ray:
        parser.error(f"{', '.join(given)} only apply with --ray")
    if args.ray:
        if args.workers != 1 or args.reload:
            parser.error("--ray replaces --workers and --reload: use --replicas")
        try:
            return _serve_ray(settings, args, prog)
        except (Exception, KeyboardInterrupt) as exc:
            if settings.log_level == "DEBUG":
                raise
            return fail(prog, exc)
    try:
        return _serve(settings, args, prog)
    except (Exception, KeyboardInterrupt) as exc:
        if settings.log_level == "DEBUG":
            raise
        return fail(prog, exc)


def _serve_ray(settings: Settings, args: argparse.Namespace, prog: str) -> int:
    from cryolens.server.ray import RayOptions, serve_forever

    chosen = {name: getattr(args, name) for name in ("replicas", "replica_cpus",
                                                     "replica_gpus", "max_replicas")
              if getattr(args, name) is not None}
    return serve_forever(settings, RayOptions(**chosen), args.address, prog)


def _serve(settings: Settings, args: argparse.Namespace, prog: str) -> int:
    problem = check_port_free(settings.host, settings.port)
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        return BIND_FAILURE_EXIT
    # The model loads before the port is bound: a missing, unsafe or broken checkpoint, or a
    # device that is not there, is one line and exit 3, never "Uvicorn running on" nor a
    # /health that says 200.
    configure_logging(settings.log_level)
    try:
        engine = load_engine(settings)
    except Exception as exc:
        if settings.log_level == "DEBUG":
            raise
        sys.stderr.write(startup_failure_line(settings, exc))
        return STARTUP_FAILURE_EXIT

    import uvicorn

    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level.lower(),
              "timeout_keep_alive": settings.keep_alive_s,
              "limit_concurrency": settings.max_connections,
              "h11_max_incomplete_event_size": settings.max_header_bytes,
              "timeout_graceful_shutdown": settings.drain_timeout_s}
    exit_zero_on_sigterm()
    if args.workers == 1 and not args.reload:
        # The app and protocol built from these very settings: no round trip through the
        # environment.
        uvicorn.run(create_app(settings, engine=engine, warm_up=True), **common,
                    http=protocol.configured(
            settings.header_timeout_s, settings.max_header_bytes, settings.send_timeout_s,
            settings.min_send_rate))
        return 0
    del engine  # it was the check; each worker process loads its own
    settings.export_env()
    uvicorn.run(APP_IMPORT_STRING, http=protocol.IMPORT_STRING, reload=args.reload,
                reload_dirs=[str(Path(__file__).resolve().parents[1])] if args.reload else None,
                workers=None if args.reload else args.workers, **common)
    return 0

if __name__ == "__main__":
    sys.exit(main())
