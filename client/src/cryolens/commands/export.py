"""``cryolens export TABLE.parquet -o particles.star|particles.tbl``: the particles of a
``cryolens embed`` table (or of a selection saved from it) written back as a RELION 5 STAR file
or a Dynamo table with its ``.doc`` catalogue, each at the centre of the box that was embedded
(see ``docs/tables.md``)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "export", parents=[common], description=__doc__.split("\n\n")[0],
        help="write an embedding table's particles back as RELION 5 STAR or a Dynamo table")
    p.add_argument("table", metavar="TABLE", help="a .parquet table from cryolens embed")
    p.add_argument("-o", "--output", required=True,
                   help="particles.star (RELION 5 tomography) or particles.tbl (Dynamo, with "
                        "particles.doc beside it) (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (default: off, an existing file is an error)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cryolens.errors import InputError
    from cryolens.tables.export import export_rows, read_rows

    table = Path(args.table)
    if not table.is_file():
        raise InputError(f"{table}: no such file", field="table")
    rows = read_rows(table)
    print(export_rows(rows, args.output, where=str(table), overwrite=args.overwrite))
    return 0
