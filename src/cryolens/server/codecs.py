"""JSON in and out of the server: orjson for speed, numpy for checking volumes.

Volumes arrive as nested JSON lists; they are checked here (shape, numbers only, finite in
float32) so that the engine only ever sees well-formed ``float32`` arrays.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from cryolens.errors import InputError, PayloadTooLarge

#: Longest piece of a parser message that goes back to the client.
MAX_MESSAGE_CHARS = 200
JSON_MEDIA_TYPE = "application/json"
_NUMERIC_KINDS = "fiu"  # float, signed and unsigned int: what a volume may hold


class ORJSONResponse(Response):
    """JSON written by orjson; numpy arrays are serialised natively (float32 stays float32)."""

    media_type = JSON_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return dumps(content)


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, default=_default,
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _default(value: Any) -> Any:
    # orjson writes only C-contiguous arrays natively (views and transposes come here)
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_MEDIA_TYPE or (media.startswith("application/") and media.endswith("+json"))


class MalformedJSON(InputError):
    """Text that is not JSON at all (400), as opposed to JSON with the wrong content (422)."""


def loads_json(text: bytes, field: str = "body") -> Any:
    """orjson.loads; NaN and Infinity are not JSON and are refused like any other bad token."""
    if not text:
        raise MalformedJSON(f"{field} is empty: expected JSON", field=field)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"{field} is malformed JSON: {truncate(str(exc))}",
                            field=field) from None


def loads_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object."""
    value = loads_json(body, "body")
    if not isinstance(value, dict):
        raise InputError(f"request body must be a JSON object, got {_json_type(value)}",
                         field="body")
    return value


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def numeric_array(value: Any, field: str, expected: str = "an array of numbers") -> np.ndarray:
    """Nested lists -> a float32 array of any shape; rejects ragged lists, non-numbers and
    values that are not finite in float32 (e.g. 1e39). Never echoes the value."""
    if isinstance(value, (str, bool, dict)) or value is None:
        raise InputError(f"{field} must be {expected}, got {_json_type(value)}", field=field)
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{field} is ragged (nested lists of different lengths): expected "
                         f"{expected}", field=field) from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"{field} must hold only numbers (no strings, null, booleans or "
                         f"objects); expected {expected}", field=field)
    with np.errstate(over="ignore", invalid="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{field} must be finite: a value is NaN, infinite or beyond float32 "
                         f"range (|x| > 3.4e38)", field=field)
    return array


def volume(value: Any, field: str, box: tuple[int, ...]) -> np.ndarray:
    """One particle: a nested list of exactly ``box`` shape -> ``box`` float32 array."""
    expected = f"a {'x'.join(map(str, box))} nested list of numbers, shape {_shape_text(box)}"
    array = numeric_array(value, field, expected)
    if array.shape != box:
        raise InputError(f"{field} must have shape {_shape_text(box)}, got "
                         f"{_shape_text(array.shape)}", field=field)
    return array


def volumes(value: Any, field: str, box: tuple[int, ...], max_volumes: int) -> np.ndarray:
    """A batch: a list of particles -> (N, *box) float32, naming the first bad one by index."""
    shape = _shape_text(("N", *box))
    if not isinstance(value, list):
        raise InputError(f"{field} must be a list of volumes, shape {shape}, got "
                         f"{_json_type(value)}", field=field)
    if not value:
        raise InputError(f"{field} is empty: expected at least one volume, shape {shape}",
                         field=field)
    if len(value) > max_volumes:
        raise PayloadTooLarge(f"{field} holds {len(value)} volumes; at most {max_volumes} are "
                              f"accepted per request", field=field)
    out = np.empty((len(value), *box), np.float32)
    for i, item in enumerate(value):
        out[i] = volume(item, f"{field}[{i}]", box)
    return out
