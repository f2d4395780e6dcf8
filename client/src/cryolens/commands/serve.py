"""``cryolens serve``: the REST server, with the options of ``cryolens-server``.

``cryolens.cli`` hands the rest of the command line to the server's own parser before its own
parser runs; this entry only lists ``serve`` in ``cryolens --help``.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser("serve", add_help=False,
                          help="run the REST server (the options of cryolens-server; see "
                               "'cryolens serve --help')")


def serve(rest: list[str]) -> int:
    """Run the server with ``rest``, the arguments after ``cryolens serve``."""
    from cryolens.server.minimal_cryolens_server import main

    return main(rest, prog="cryolens serve") or 0
