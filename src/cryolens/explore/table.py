"""The table an explorer serves: the Parquet file of ``cryolens embed``, its embedding matrix,
and its other columns as colours, tooltips and search.

Rows are the file's row numbers, 0 .. N-1, everywhere (the API, the page, the exports).
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryolens.embcolumns import embedding_columns
from cryolens.errors import InputError
from cryolens.explore.errors import UnknownColumn, UnknownRow

#: Numbers with at most this many distinct values are shown as categories (as `cryolens map`).
FEW_NUMBERS = 12
#: Text columns with more distinct values than this are searchable but not a colour.
MAX_CATEGORIES = 256
#: Text columns that search looks in (a particle's id and where it came from).
SEARCH_COLUMNS = ("particle_key", "source", "run", "object", "user_id", "session_id",
                  "tomo_type")
NONE_LABEL = "(none)"


@dataclass
class Column:
    """How a column is shown: ``number`` (a colour bar over min..max), ``category`` (a
    legend; ``codes`` index ``categories``, NONE_LABEL last when some rows have no value) or
    ``text`` (searchable, too many values to colour by)."""

    name: str
    kind: str
    categories: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    values: np.ndarray | None = None  # (N,) float32: codes or numbers (NaN: no value)

    def describe(self) -> dict:
        out: dict = {"name": self.name, "kind": self.kind}
        if self.kind == "category":
            out.update(categories=self.categories, counts=self.counts)
        if self.kind == "number":
            out.update(min=self.minimum, max=self.maximum)
        return out


class EmbeddingTable:
    """``arrow``: the file's table; ``embeddings`` (N, k) float32; ``meta``: its ``cryolens``
    metadata (empty for tables written by other tools). Open one with :meth:`open`."""

    def __init__(self, path: Path, arrow, embeddings: np.ndarray, meta: dict) -> None:
        self.path, self.arrow, self.embeddings, self.meta = path, arrow, embeddings, meta
        self.embedding_names = embedding_columns(arrow.column_names)
        self._columns: dict[str, Column] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingTable:
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file", field="table")
        try:
            arrow = pq.read_table(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc}); explore reads the "
                             "Parquet file `cryolens embed -o x.parquet` writes",
                             field="table") from exc
        names = embedding_columns(arrow.column_names)
        if not names:
            raise InputError(f"{path} has no embedding_0 .. embedding_k columns; explore reads "
                             "the Parquet file `cryolens embed -o x.parquet` writes",
                             field="table")
        if arrow.num_rows == 0:
            raise InputError(f"{path} has no rows", field="table")
        embeddings = np.empty((arrow.num_rows, len(names)), np.float32)
        try:
            for k, name in enumerate(names):
                embeddings[:, k] = arrow[name].to_numpy()
        except Exception as exc:
            raise InputError(f"{path}: the embedding columns are not all numbers ({exc})",
                             field="table") from exc
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        if len(bad):
            raise InputError(f"{path}: row {bad[0]} has a NaN or infinite embedding value "
                             f"({len(bad)} rows in all)", field="table")
        meta = json.loads((arrow.schema.metadata or {}).get(b"cryolens", b"{}") or b"{}")
        return cls(path, arrow, embeddings, meta)

    @property
    def rows(self) -> int:
        return self.arrow.num_rows

    def check_row(self, row: int | str) -> int:
        """``row`` as an int 0 .. N-1, or :class:`UnknownRow` that says the range."""
        try:
            number = int(str(row))
        except ValueError:
            number = -1
        if not 0 <= number < self.rows:
            raise UnknownRow(f"no row {row}: rows are 0 .. {self.rows - 1}", field="row")
        return number

    def check_rows(self, rows) -> np.ndarray:
        """A list of row numbers as an int64 array, each checked, duplicates refused."""
        out = np.asarray(list(rows), dtype=np.int64) if len(rows) else np.zeros(0, np.int64)
        if out.size == 0:
            raise InputError("no rows selected", field="rows")
        wrong = out[(out < 0) | (out >= self.rows)]
        if len(wrong):
            raise UnknownRow(f"no row {int(wrong[0])}: rows are 0 .. {self.rows - 1}",
                             field="rows")
        if len(np.unique(out)) != len(out):
            raise InputError("rows lists a row twice", field="rows")
        return out

    # -- columns ------------------------------------------------------------------------------
    def column_names(self) -> list[str]:
        """Every column but the embedding's, then the columns added since (clusters)."""
        skip = set(self.embedding_names)
        names = [n for n in self.arrow.column_names if n not in skip]
        return names + [n for n in self._columns if n not in self.arrow.column_names]

    def column(self, name: str) -> Column:
        with self._lock:
            if name not in self._columns:
                if name not in self.arrow.column_names or name in self.embedding_names:
                    raise UnknownColumn(f"no column {name!r}; columns: "
                                        f"{', '.join(self.column_names())}", field="column")
                self._columns[name] = _describe(name, self.arrow[name])
            return self._columns[name]

    def add_category(self, name: str, codes: np.ndarray, categories: list[str]) -> Column:
        """A column of categories made here (a clustering), replacing one of the same name."""
        if name in self.arrow.column_names:
            raise InputError(f"the table already has a column {name!r}", field="name")
        codes = np.asarray(codes, np.int64)
        counts = np.bincount(codes, minlength=len(categories)).tolist()
        column = Column(name, "category", list(categories), counts,
                        values=codes.astype(np.float32))
        with self._lock:
            self._columns[name] = column
        return column

    def default_color(self) -> str | None:
        for name in ("object", "run", "source"):
            present = name in self.arrow.column_names and \
                self.arrow[name].null_count < self.rows
            if present and self.column(name).kind == "category":
                return name
        return None

    # -- rows ---------------------------------------------------------------------------------
    def row(self, row: int) -> dict:
        """The row's values, embedding left out, with the columns added since."""
        skip = set(self.embedding_names)
        names = [n for n in self.arrow.column_names if n not in skip]
        values = self.arrow.select(names).slice(row, 1).to_pylist()[0]
        for name, column in self._columns.items():
            if name not in values and column.kind == "category":
                values[name] = column.categories[int(column.values[row])]
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in values.items()}

    def search(self, query: str, limit: int) -> tuple[list[int], int]:
        """Rows whose number is ``query``, or whose id or source columns contain it (any case):
        the first ``limit`` of them, the row of that number first and the rest in row order,
        and how many there are."""
        import pyarrow.compute as pc

        query = query.strip()
        if not query:
            raise InputError("search for something: a row number, a particle id or part of a "
                             "source, run or object", field="q")
        hits = np.zeros(self.rows, bool)
        for name in SEARCH_COLUMNS:
            if name in self.arrow.column_names and _is_text(self.arrow[name].type):
                found = pc.match_substring(self.arrow[name], query, ignore_case=True)
                hits |= found.fill_null(False).to_numpy(zero_copy_only=False)
        numbered = int(query) if query.isdigit() and int(query) < self.rows else None
        if numbered is not None:
            hits[numbered] = False  # listed first below
        rows = np.flatnonzero(hits).tolist()
        if numbered is not None:
            rows.insert(0, numbered)
        return rows[:limit], len(rows)


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _describe(name: str, chunked) -> Column:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = chunked.type
    numeric = (pa.types.is_integer(kind) or pa.types.is_floating(kind))
    if numeric:
        values = chunked.to_numpy(zero_copy_only=False).astype(np.float64)
        finite = values[np.isfinite(values)]
        if len(np.unique(finite)) > FEW_NUMBERS:
            return Column(name, "number", minimum=float(finite.min()),
                          maximum=float(finite.max()), values=values.astype(np.float32))
    elif not (_is_text(kind) or pa.types.is_boolean(kind)):
        return Column(name, "text")
    distinct = pc.unique(chunked.drop_null())
    if len(distinct) > MAX_CATEGORIES:
        return Column(name, "text")
    ordered = pc.take(distinct, pc.sort_indices(distinct))
    codes = pc.index_in(chunked, value_set=ordered).to_numpy(zero_copy_only=False)
    categories = [_label(v) for v in ordered.to_pylist()]
    codes = np.where(np.isnan(codes.astype(np.float64)), len(categories), codes)
    if chunked.null_count:
        categories.append(NONE_LABEL)
    counts = np.bincount(codes.astype(np.int64), minlength=len(categories)).tolist()
    return Column(name, "category", categories, counts, values=codes.astype(np.float32))


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


__all__ = ["Column", "EmbeddingTable", "embedding_columns"]
