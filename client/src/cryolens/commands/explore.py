"""``cryolens explore embeddings.parquet``: the table of ``cryolens embed`` as a map in the
browser: click a particle to see its slices, its reconstruction and its nearest neighbours;
select groups, cluster, search, and export a selection as CSV, Parquet or copick picks.

It serves a page on loopback (``--host 127.0.0.1``) by default: anyone who can reach the port
can read the table and write picks into its copick project. See ``docs/explore.md``.
"""
from __future__ import annotations

import argparse
import sys
import threading

from cryolens.errors import InputError


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "explore", parents=[common], description=__doc__.split("\n\n")[0],
        help="explore a table of embeddings in the browser: map, particles, neighbours, picks")
    p.add_argument("table", help="the Parquet file `cryolens embed -o x.parquet` wrote")
    model = p.add_argument_group("reconstructions").add_mutually_exclusive_group()
    model.add_argument("--checkpoint", "-c", default=None,
                       help="reconstruct with this checkpoint in-process: a name (demo, v001), "
                            "a URL or a file (default: the table's own, when it is a named "
                            "one; otherwise no reconstructions)")
    model.add_argument("--server", default=None, metavar="URL",
                       help="reconstruct on a running CryoLens server instead")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto, for --checkpoint (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8024, help="port (default: %(default)s)")
    p.set_defaults(run=run)


def model(args: argparse.Namespace, table) -> tuple:
    """(reconstruct, described) for :meth:`cryolens.explore.app.Explorer.open`."""
    from cryolens.explore.particles import engine_reconstructor, server_reconstructor

    if args.server:
        from cryolens.client import CryoLensClient

        return server_reconstructor(CryoLensClient(args.server)), f"server {args.server}"
    name = args.checkpoint or table.meta.get("checkpoint_name")
    if name is not None and args.checkpoint is None:
        from cryolens.checkpoints import REGISTRY  # imports torch: only when a name may load

        name = name if name in REGISTRY else None
    if name is None:
        made_with = table.meta.get("checkpoint_name") or "an unnamed model"
        print(f"note: no reconstructions: the table was embedded with {made_with}; pass "
              "--checkpoint or --server to see them", file=sys.stderr)
        return None, None
    from cryolens.engine import Engine

    engine = Engine.from_checkpoint(name, device=args.device)
    sha = table.meta.get("checkpoint_sha256")
    if sha and getattr(engine.checkpoint, "sha256", sha) != sha:
        made_with = table.meta.get("checkpoint_name")
        print(f"warning: the table was embedded with another model ({made_with}) than the "
              f"{name} that reconstructs here", file=sys.stderr)
    return engine_reconstructor(engine), f"{name}, in-process"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cryolens.explore.app import Explorer, create_app
    from cryolens.explore.table import EmbeddingTable

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0 .. 65535, not {args.port}", field="port")
    table = EmbeddingTable.open(args.table)
    reconstruct, described = model(args, table)
    explorer = Explorer.open(table, reconstruct, described)
    # the map's layout computed while the server starts and the browser opens (a request for
    # it waits for this one)
    threading.Thread(target=explorer.layouts.get, args=("pca",), daemon=True).start()
    app = create_app(explorer)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach port {args.port} can "
              "read the table and write picks into its copick project", file=sys.stderr)
    print(f"exploring {table.rows} rows of {table.path}: open http://{args.host}:{args.port}/ "
          "(Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
