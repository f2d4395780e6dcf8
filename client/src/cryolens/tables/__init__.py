"""Particles where RELION, Warp, Dynamo and IMOD users keep them: STAR, Dynamo ``.tbl`` and IMOD
``.mod`` tables read into boxes cut from tomograms, and embeddings' rows written back as STAR or
``.tbl`` (conventions and their sources in ``docs/tables.md``).

:mod:`.read` turns a table and its tomograms into particle positions (``cryolens.io`` cuts the
boxes, as for copick picks); :mod:`.export` writes rows of a ``cryolens embed`` table back;
:mod:`.conventions` holds each format's coordinate convention, both ways.
"""
from __future__ import annotations

from cryolens.tables.read import INSTALL_TABLES, TABLE_SUFFIXES, Pick, TableOptions, read_table

__all__ = ["INSTALL_TABLES", "TABLE_SUFFIXES", "Pick", "TableOptions", "read_table"]
