"""The names an embeddings table is read by, whatever its file format: its embedding columns and
its key-value metadata (:mod:`cryolens.embtable` writes Parquet, :mod:`cryolens.h5layout` HDF5)."""
from __future__ import annotations

#: The key-value metadata an embeddings table carries.
METADATA_KEYS = ("cryolens", "checkpoint_name", "checkpoint_sha256")


def embedding_columns(names) -> list[str]:
    """The ``embedding_<k>`` columns among ``names``, in the order of k."""
    found = [n for n in names if n.startswith("embedding_") and n[10:].isdigit()]
    return sorted(found, key=lambda n: int(n[10:]))


__all__ = ["METADATA_KEYS", "embedding_columns"]
