"""The explorer's web app: the page (``static/``) and the API under ``/api`` it uses,
documented in ``docs/explore.md``. Rows are the table's row numbers; the browser never names a
path. Errors are JSON ``{"detail": message, "field": name}`` with the status of
:mod:`cryolens.explore.errors`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from cryolens.errors import CryoLensError, InputError
from cryolens.explore import clusters, exports
from cryolens.explore.errors import status_of
from cryolens.explore.layout import Layouts, available
from cryolens.explore.neighbours import MAX_K, Neighbours
from cryolens.explore.particles import MAX_SCALE, Reconstruct, Reconstructions, slices_png
from cryolens.explore.sources import ParticleSource, read_options
from cryolens.explore.table import EmbeddingTable

STATIC = Path(__file__).parent / "static"
#: Most rows a search answers with (it also says how many matched).
SEARCH_LIMIT = 100_000
PNG = "image/png"
BINARY = "application/octet-stream"


@dataclass
class Explorer:
    """Everything the API serves from one table."""

    table: EmbeddingTable
    layouts: Layouts
    neighbours: Neighbours
    particles: ParticleSource
    reconstructions: Reconstructions
    copick: str | None

    @classmethod
    def open(cls, table: EmbeddingTable, reconstruct: Reconstruct | None = None,
             described: str | None = None) -> Explorer:
        """``reconstruct``: a volume's reconstruction (see :mod:`~cryolens.explore.particles`),
        ``described`` how, in words (``demo, in-process``); without it, no reconstructions."""
        return cls(table, Layouts(table.path, table.embeddings),
                   Neighbours(table.embeddings),
                   ParticleSource(table.row, read_options(table.meta)),
                   Reconstructions(reconstruct, described), exports.copick_project(table))


class Rows(BaseModel):
    rows: list[int] = Field(description="row numbers of the table")


class CopickExport(Rows):
    object: str = Field(description="pickable object of the project the picks are of")
    user_id: str = Field(default="cryolens-explore", description="copick user id of the picks")
    session_id: str = Field(description="copick session id; the picks must not exist yet")


class Cluster(BaseModel):
    method: Literal["kmeans", "hdbscan"] = "kmeans"
    k: int = Field(default=8, description="k-means: number of clusters")
    min_cluster_size: int = Field(default=10, description="HDBSCAN: smallest cluster")
    seed: int = Field(default=0, description="k-means: random seed of its starting centres")


def create_app(explorer: Explorer) -> FastAPI:
    # no /docs page: FastAPI's would load its scripts from a CDN, and the explorer is offline
    app = FastAPI(title="CryoLens explorer", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    table = explorer.table

    @app.exception_handler(CryoLensError)
    async def refused(request: Request, exc: CryoLensError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": getattr(exc, "field", None)},
                            status_of(exc))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/table")
    def describe_table() -> dict:
        """The table: rows, embedding width, columns, what can be computed here."""
        objects = None
        if explorer.copick:
            try:
                objects = exports.copick_objects(explorer.copick)
            except Exception:  # noqa: BLE001 - no copick here, or the project is gone: no picks
                objects = None
        return {"name": table.path.name, "rows": table.rows, "dims": len(table.embedding_names),
                "columns": table.column_names(),
                "default_color": table.default_color(), "layouts": available(),
                "reconstruction": explorer.reconstructions.described,
                "checkpoint": table.meta.get("checkpoint_name"),
                "copick": None if objects is None else {"objects": objects},
                "max_k": min(MAX_K, table.rows - 1)}

    _add_view_routes(app, explorer)
    _add_action_routes(app, explorer)
    return app


def _add_view_routes(app: FastAPI, explorer: Explorer) -> None:
    """What the page reads: layouts, columns, rows, neighbours, images, search."""
    table = explorer.table

    @app.get("/api/layout")
    def layout(method: str = "pca") -> Response:
        """(N, 2) float32 little-endian x, y per row in [-1, 1]; ``X-Layout`` (JSON) says how
        it was made."""
        coords, info = explorer.layouts.get(method)
        return Response(np.ascontiguousarray(coords, "<f4").tobytes(), media_type=BINARY,
                        headers={"X-Layout": json.dumps(info)})

    @app.get("/api/column/{name}")
    def column(name: str) -> dict:
        """How a column is coloured: ``number`` (min, max), ``category`` (categories, counts)
        or ``text`` (not colourable)."""
        return table.column(name).describe()

    @app.get("/api/values/{name}")
    def values(name: str) -> Response:
        """(N,) float32 little-endian: a category's code (index into its categories) or the
        number (NaN: none) of each row."""
        described = table.column(name)
        if described.values is None:
            raise InputError(f"column {name!r} has too many distinct values to colour by",
                             field="column")
        return Response(described.values.astype("<f4").tobytes(), media_type=BINARY)

    @app.get("/api/rows/{row}")
    def row(row: str) -> dict:
        """One row's columns (the embedding left out)."""
        number = table.check_row(row)
        return {"row": number, "values": table.row(number)}

    @app.get("/api/neighbours/{row}")
    def neighbours(row: str, k: int = Query(10, description="how many neighbours")) -> dict:
        """The exact ``k`` nearest rows by Euclidean distance over the embedding columns, the
        row itself excluded, nearest first."""
        rows, distances = explorer.neighbours.query(table.check_row(row), k)
        return {"rows": rows.tolist(), "distances": distances.tolist()}

    @app.get("/api/particle/{row}.png", response_class=Response,
             responses={200: {"content": {PNG: {}}}})
    def particle(row: str, scale: int = 3) -> Response:
        """Central z | y | x slices of the row's particle, read from its source."""
        number = table.check_row(row)
        volume = explorer.particles.volume(number)
        return Response(slices_png(volume, _scale(scale)), media_type=PNG)

    @app.get("/api/reconstruction/{row}.png", response_class=Response,
             responses={200: {"content": {PNG: {}}}})
    def reconstruction(row: str, scale: int = 3) -> Response:
        """Central z | y | x slices of the row's reconstruction in its predicted pose."""
        number = table.check_row(row)
        scale = _scale(scale)
        volume = explorer.particles.volume(number)
        return Response(slices_png(explorer.reconstructions.get(number, volume), scale),
                        media_type=PNG)

    @app.get("/api/search")
    def search(q: str, limit: int = SEARCH_LIMIT) -> dict:
        """Rows whose number is ``q`` or whose id, source, run or object contains it."""
        rows, total = table.search(q, max(1, min(limit, SEARCH_LIMIT)))
        return {"rows": rows, "total": total}


def _add_action_routes(app: FastAPI, explorer: Explorer) -> None:
    """What the page asks to be done: clustering, and exports of a selection."""
    table = explorer.table

    @app.post("/api/cluster")
    def cluster(body: Cluster) -> dict:
        """Cluster the embeddings; the result is a new category column to colour by."""
        if body.method == "kmeans":
            labels = clusters.kmeans(table.embeddings, body.k, body.seed)
            name = f"kmeans_{body.k}"
        else:
            labels = clusters.hdbscan(table.embeddings, body.min_cluster_size)
            name = f"hdbscan_{body.min_cluster_size}"
        codes, categories = clusters.as_categories(labels)
        return table.add_category(name, codes, categories).describe()

    @app.post("/api/export/csv", response_class=Response,
              responses={200: {"content": {"text/csv": {}}}})
    def export_csv(body: Rows) -> Response:
        """The rows as CSV: ``table_row``, then every column of the table."""
        data = exports.csv_bytes(table, table.check_rows(body.rows))
        return _download(data, "text/csv", f"{table.path.stem}-selection.csv")

    @app.post("/api/export/parquet", response_class=Response,
              responses={200: {"content": {BINARY: {}}}})
    def export_parquet(body: Rows) -> Response:
        """The rows as a Parquet subset of the table, its metadata kept."""
        data = exports.parquet_bytes(table, table.check_rows(body.rows))
        return _download(data, BINARY, f"{table.path.stem}-selection.parquet")

    @app.post("/api/export/copick")
    def export_copick(body: CopickExport) -> dict:
        """The rows as copick picks of ``object`` by ``user_id`` in a new ``session_id``."""
        if explorer.copick is None:
            raise InputError("the table's rows do not come from one copick project",
                             field="rows")
        return exports.write_picks(table, table.check_rows(body.rows), body.object,
                                   body.user_id, body.session_id)


def _scale(scale: int) -> int:
    if not 1 <= scale <= MAX_SCALE:
        raise InputError(f"scale must be a whole number from 1 to {MAX_SCALE}, not {scale}",
                         field="scale")
    return scale


def _download(data: bytes, media_type: str, name: str) -> Response:
    return Response(data, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


__all__ = ["Explorer", "create_app"]
