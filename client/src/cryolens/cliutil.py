"""What the ``cryolens`` and ``cryolens-server`` command lines share: help that shows every
default, usage errors in one line, and failures in one line unless the log level is DEBUG.

Exit statuses: 0 success, 1 a failure while running (``prog: message`` on stderr), 2 a usage
error (``prog: error: message (see prog --help)``), 3 a server whose model cannot load, or a
command that needs cryolens-server run where only cryolens-client is installed, 130
interrupted with Ctrl-C.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import NoReturn

FAILURE_EXIT = 1
USAGE_EXIT = 2
NEEDS_SERVER_EXIT = 3
#: What a command that computes here says where cryolens-server (PyTorch, the engine) is absent.
NEEDS_SERVER = "install cryolens-server for local inference"
INTERRUPTED_EXIT = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help text; line breaks of descriptions kept as written.

    A default of None or False (a switch) is not shown: such help says in words what happens.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line that points at ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 particle``, ``2 particles``: ``n`` and the noun in the number it needs."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def positive_number(text: str) -> float:
    """An argparse ``type``: a positive, finite number (argparse names the option at fault)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (argparse names the option at fault)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


#: How the library names an option in a message: ``fit=True (--fit)``, the Python keyword and
#: value, then the command-line flag in brackets. A command line keeps the flag alone.
_PYTHON_OPTION = re.compile(r"\b[a-z_]+(?:=\S+)? \((--[a-z][a-z-]*)\)")


def cli_wording(message: str) -> str:
    """``message`` with each ``keyword=value (--flag)`` said as ``--flag``, the way the user of
    a command line wrote it."""
    return _PYTHON_OPTION.sub(r"\1", message)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__


def fail(prog: str, exc: BaseException) -> int:
    """Print ``prog: message`` on stderr and return the exit status for ``exc``.

    Errors this package raises on purpose, and the usual file and value errors, are reported by
    their message alone; anything else also names its type and how to see the traceback.
    """
    from cryolens.errors import CryoLensError

    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    if isinstance(exc, (CryoLensError, OSError, ValueError)):
        print(f"{prog}: {cli_wording(one_line(exc))}", file=sys.stderr)
    else:
        print(f"{prog}: {type(exc).__name__}: {one_line(exc)} (run again with --log-level debug "
              "for the traceback)", file=sys.stderr)
    return FAILURE_EXIT


def needs_server(exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` means that this environment has cryolens-client without cryolens-server:
    PyTorch or one of the server's ``cryolens`` modules is missing."""
    from importlib.util import find_spec

    name = exc.name or ""
    if name.split(".")[0] != "torch" and not name.startswith("cryolens."):
        return False
    return find_spec("torch") is None or find_spec("cryolens.engine") is None


def quiet_broken_pipe() -> int:
    """The exit status after the reader of standard output went away (``cryolens info | head``):
    nothing more is written there, not even by Python's final flush, and nothing is said."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return FAILURE_EXIT
