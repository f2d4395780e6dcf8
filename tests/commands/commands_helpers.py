"""Run the ``cryolens`` console in-process, and read what the commands wrote."""
from __future__ import annotations

from cryolens.cli import main
from cryolens.operations import Operation, run


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _features(engine, volumes):
    return run(engine, Operation(kind="features"), volumes).arrays


def _index(folder):
    import csv

    with (folder / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))
