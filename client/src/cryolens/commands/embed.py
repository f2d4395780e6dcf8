"""``cryolens embed SOURCE... -o embeddings.parquet``: one row per particle with its source,
embedding (latent mean), pose (unit quaternion w, x, y, z) and global weight.

The table and its columns: :mod:`cryolens.embtable` (Parquet) and :mod:`cryolens.h5layout`
(``-o x.h5``, CryoLens's copick-embedding layout); the resumable run: :mod:`cryolens.store`;
the numbers come from an engine here or a server (:mod:`cryolens.compute`), or a Ray cluster
(:mod:`cryolens.batch`). Either way the output's metadata records the model (name, sha256,
latent and affinity dimensions, voxel size, box).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from cryolens.commands._common import (
    SOURCES_HELP,
    add_engine_options,
    add_input_options,
    add_progress_option,
    copick_options,
    load_engine,
    open_from_args,
    read_options,
    table_options,
)
from cryolens.embtable import FORMATS
from cryolens.errors import InputError

EXAMPLES = """examples:
  cryolens embed particles/ -o embeddings.parquet
  cryolens embed stack.mrcs more/ -o embeddings.h5 --fit --rescale
  cryolens embed copick_config.json --object ribosome --voxel-spacing 10 -o picks.parquet
  cryolens embed particles/ -o embeddings.parquet --server http://gpu-node:8023
Run the same command again after an interruption: it resumes where it stopped."""


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "embed", parents=[common], description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        help="embed your particles: one row per particle (Parquet or HDF5)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="embeddings.parquet (plain numeric columns) or embeddings.h5 (CryoLens's "
                        "copick-embedding layout) (required)")
    add_input_options(p)
    add_engine_options(p)
    p.add_argument("--server", default=None, metavar="URL",
                   help="compute on a running CryoLens server instead of in-process; the "
                        "output records its model the same way (default: in-process)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: discard an existing output and unfinished parts "
                        "(default: off, resume)")
    add_progress_option(p)
    from cryolens.batch import add_ray_options

    add_ray_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cryolens.compute import engine_compute, engine_metadata, server_compute
    from cryolens.store import embed

    began = getattr(args, "began", None) or time.perf_counter()  # set by cryolens.cli.main
    out = Path(args.output)
    if out.suffix.lower() not in FORMATS:
        raise InputError(f"{args.output}: the output must end in .parquet or .h5",
                         field="output")
    if args.server:
        if getattr(args, "ray", False):
            raise InputError("--ray computes on a Ray cluster and --server on a server: "
                             "choose one", field="ray")
        compute, metadata = server_compute(args.server)
    else:
        engine = load_engine(args)
        compute, metadata = engine_compute(engine), engine_metadata(engine)
    particles = open_from_args(args, box=metadata["box_size"])
    identity = {
        "sources": [str(Path(s).resolve()) for s in args.sources],
        "read": asdict(read_options(args)),
        "copick": asdict(copick_options(args)),
        "checkpoint_sha256": metadata["checkpoint_sha256"],
        "server": args.server,
    }
    if args.tomograms is not None or args.coordinate_pixel_size is not None:
        identity["tables"] = {**asdict(table_options(args)), "tomograms": str(
            Path(args.tomograms).resolve()) if args.tomograms is not None else None}
    results = None
    if getattr(args, "ray", False):  # read and compute on a Ray cluster (cryolens.batch)
        if args.tomograms is not None:
            raise InputError("--ray does not read particle tables yet; embed them without --ray",
                             field="ray")
        from cryolens.batch import ray_results

        results = ray_results(particles, args)
    try:
        summary = embed(particles, compute, out, identity=identity, metadata=metadata,
                        batch_size=args.batch_size, progress=not args.quiet,
                        overwrite=args.overwrite, results=results, began=began)
    finally:
        particles.close()
    print(summary["line"])
    return 0
