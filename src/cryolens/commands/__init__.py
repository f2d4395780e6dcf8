"""Console sub-commands for people with their own particles: ``embed``, ``reconstruct``,
``show``, ``map`` and ``info``.

Each module has ``add_parser(subparsers, common)`` and ``run(args) -> int``; :func:`register`
adds them all to the ``cryolens`` parser (``cryolens.cli``).
"""
from __future__ import annotations

import argparse
from importlib import import_module

#: Sub-commands registered by :func:`register` (``info`` is wired by ``cryolens.cli``).
COMMANDS = ("embed", "reconstruct", "show", "map", "explore")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add each command; ``common`` holds the options every command shares (--log-level)."""
    for name in COMMANDS:
        import_module(f"cryolens.commands.{name}").add_parser(subparsers, common)


__all__ = ["COMMANDS", "register"]
