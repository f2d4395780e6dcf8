"""The ``cryolens`` console: embed, reconstruct, picture and map your particles; inspect, train
and evaluate models; serve them.

The sub-commands are the modules of :mod:`cryolens.commands`, registered there in one list;
``cryolens <command> --help`` lists a command's options with their defaults. ``cryolens serve``
hands the rest of its command line to the server's own parser, and ``cryolens train`` to its
own (both need cryolens-server, so ``cryolens --help`` builds neither). A failure prints one
line, ``cryolens: <message>``, and exits 1 (usage errors exit 2); ``--log-level debug`` shows
the traceback instead. Where only cryolens-client is installed, the commands that compute here
say ``cryolens: install cryolens-server for local inference`` and exit 3.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cryolens import __version__, heap
from cryolens.cliutil import (
    NEEDS_SERVER,
    NEEDS_SERVER_EXIT,
    ArgumentParser,
    fail,
    needs_server,
    quiet_broken_pipe,
)


def _common_options() -> argparse.ArgumentParser:
    """Options every sub-command has."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, default="WARNING",
                        choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"),
                        help="logging level, any case; DEBUG also prints the traceback of a "
                             "failure")
    return common


def build_parser() -> ArgumentParser:
    from cryolens.commands import register

    parser = ArgumentParser(
        prog="cryolens",
        description="CryoLens: embed, reconstruct and picture your 48^3 cryo-ET particles; "
                    "inspect, train and evaluate\nmodels, and serve them over HTTP.\n"
                    "'cryolens COMMAND --help' lists the options of a command. A failure is one "
                    "line on stderr\n(exit status 1); add --log-level debug to see its "
                    "traceback.")
    parser.add_argument("--version", action="version", version=f"cryolens {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub, _common_options())
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except ModuleNotFoundError as exc:
        if not needs_server(exc):
            raise
        print(f"cryolens: {NEEDS_SERVER}", file=sys.stderr)
        return NEEDS_SERVER_EXIT


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line ``argv`` (without the program's name) as :func:`main` reads it; not
    ``cryolens serve``, whose arguments are the server's."""
    if argv[:1] == ["train"]:
        from cryolens.commands.train import build_parser as train_parser

        return train_parser(_common_options()).parse_args(argv[1:])
    return build_parser().parse_args(argv)


def _main(argv: list[str]) -> int:
    began = time.perf_counter()  # a command's summary counts its whole wall time from here
    if argv[:1] == ["serve"]:
        from cryolens.commands.serve import serve

        return serve(argv[1:])
    args = parse_args(argv)
    args.began = began
    heap.tune()  # the engine's batches without page faults (cryolens/heap.py)
    # force: each call (tests call main in-process) logs to the stderr of its own time
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    try:
        status = args.run(args)
        sys.stdout.flush()  # here, so that a reader gone away is a BrokenPipeError caught below
        return status
    except BrokenPipeError:  # `cryolens info demo | head`: the reader has all it wanted
        return quiet_broken_pipe()
    except (Exception, KeyboardInterrupt) as exc:
        if args.log_level == "DEBUG" or (isinstance(exc, ModuleNotFoundError)
                                         and needs_server(exc)):
            raise  # the traceback, or main's one line
        return fail("cryolens", exc)


if __name__ == "__main__":
    sys.exit(main())
