"""The ``cryolens`` sub-commands, one module each: the one registry of the console.

Each module ``cryolens.commands.<name>`` has ``add_parser(subparsers, common)``, which adds its
parser and sets ``run`` (``run(args) -> int``) as its default; :func:`register` adds them all
to the ``cryolens`` parser (``cryolens.cli``), in the order of :data:`COMMANDS`, which is the
order ``cryolens --help`` lists them in. A new command is a new module and its name here.
"""
from __future__ import annotations

import argparse
from importlib import import_module

#: Every sub-command, in the order ``cryolens --help`` lists them.
COMMANDS = ("embed", "reconstruct", "show", "map", "explore", "export", "info", "serve",
            "train", "evaluate")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add each command; ``common`` holds the options every command shares (--log-level)."""
    for name in COMMANDS:
        import_module(f"cryolens.commands.{name}").add_parser(subparsers, common)


__all__ = ["COMMANDS", "register"]
