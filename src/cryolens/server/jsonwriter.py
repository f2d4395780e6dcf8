"""JSON out of the server: orjson's bytes, big arrays written a row at a time.

No Starlette here: ``responses.py`` wraps these bytes in HTTP responses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson

JSON_MEDIA_TYPE = "application/json"


#: Arrays larger than this are written row by row, so the writing thread yields the GIL often.
ROW_WISE_BYTES = 256 * 1024
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    """JSON bytes, exactly ``orjson.dumps``'s; the big arrays of a dict (nested dicts too) are
    written a row (of a 2-D array: a plane of a volume) at a time, so the writing thread yields
    the GIL between rows, and the pieces are joined once."""
    if not isinstance(content, dict) or not _has_row_wise(content):
        return orjson.dumps(content, default=_default, option=_OPTIONS)
    parts: list[bytes] = []
    _write(content, parts)
    return b"".join(parts)


def _has_row_wise(content: dict) -> bool:
    return any(_row_wise(v) or (isinstance(v, dict) and _has_row_wise(v))
               for v in content.values())


def _write(value: Any, parts: list[bytes]) -> None:
    if isinstance(value, dict):
        parts.append(b"{")
        for i, (key, item) in enumerate(value.items()):
            parts.append(b"," if i else b"")
            parts.append(orjson.dumps(str(key)) + b":")
            _write(item, parts)
        parts.append(b"}")
    elif _row_wise(value):
        parts.append(b"[")
        for i, row in enumerate(value):
            parts.append(b"," if i else b"")
            _write(row, parts)
        parts.append(b"]")
    else:
        parts.append(orjson.dumps(value, default=_default, option=_OPTIONS))


def _row_wise(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim > 1 and value.nbytes > ROW_WISE_BYTES


def _default(value: Any) -> Any:
    # orjson writes only C-contiguous arrays natively (views and transposes come here)
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_MEDIA_TYPE or (media.startswith("application/")
                                         and media.endswith("+json"))
