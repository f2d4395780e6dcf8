"""The explorer's errors beyond :class:`cryolens.errors.InputError` (422), and their HTTP status.

    InputError                 422  a value the caller got wrong (k, a column, an object name)
    ├── UnknownRow             404  a row number the table does not have
    ├── UnknownColumn          404  a column the table does not have
    ├── NoSource               404  a row whose particle cannot be read again from its source
    ├── NoModel                409  a reconstruction asked of an explorer started without one
    ├── AlreadyExists          409  copick picks of that object, user and session exist already
    └── NotWritable            403  the copick project cannot be written; nothing was written
    ModelFailed                502  the model (a server, for --server) did not reconstruct
"""
from __future__ import annotations

from cryolens.errors import CryoLensError, InputError


class UnknownRow(InputError):
    status = 404


class UnknownColumn(InputError):
    status = 404


class NoSource(InputError):
    status = 404


class NoModel(InputError):
    status = 409


class AlreadyExists(InputError):
    status = 409


class NotWritable(InputError):
    status = 403


class ModelFailed(CryoLensError):
    status = 502


def status_of(exc: CryoLensError) -> int:
    return getattr(exc, "status", 422 if isinstance(exc, InputError) else 500)


__all__ = ["AlreadyExists", "ModelFailed", "NoModel", "NoSource", "NotWritable", "UnknownColumn",
           "UnknownRow", "status_of"]
