"""JSON in and out of the server: orjson for speed, numpy for checking volumes.

Volumes arrive as nested JSON lists; they are checked here (shape, numbers only, finite in
float32) so that the engine only ever sees well-formed ``float32`` arrays. No Starlette here:
``responses.py`` wraps these bytes in HTTP responses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from cryolens.errors import InputError, MalformedBody, PayloadTooLarge

#: Longest piece of a parser message that goes back to the client.
MAX_MESSAGE_CHARS = 200
JSON_MEDIA_TYPE = "application/json"
_NUMERIC_KINDS = "fiu"  # float, signed and unsigned int: what a volume may hold


#: Arrays larger than this are written row by row, so the writing thread yields the GIL often.
ROW_WISE_BYTES = 4 * 1024**2
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    """JSON bytes; a top-level dict's big arrays go out one row at a time (same bytes)."""
    if not isinstance(content, dict) or not any(_row_wise(v) for v in content.values()):
        return orjson.dumps(content, default=_default, option=_OPTIONS)
    parts = []
    for key, value in content.items():
        if _row_wise(value):
            text = b"[" + b",".join(orjson.dumps(row, default=_default, option=_OPTIONS)
                                    for row in value) + b"]"
        else:
            text = orjson.dumps(value, default=_default, option=_OPTIONS)
        parts.append(orjson.dumps(str(key)) + b":" + text)
    return b"{" + b",".join(parts) + b"}"


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
    return media == JSON_MEDIA_TYPE or (media.startswith("application/") and media.endswith("+json"))


def loads_json(text: bytes, field: str = "body") -> Any:
    """orjson.loads; NaN and Infinity are not JSON and are refused like any other bad token."""
    if not text:
        raise MalformedBody(f"{field} is empty: expected JSON", field=field)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"{field} is malformed JSON: {truncate(str(exc))}",
                            field=field) from None


def loads_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object."""
    value = loads_json(body, "body")
    if not isinstance(value, dict):
        raise InputError(f"request body must be a JSON object, got {_json_type(value)}",
                         field="body")
    return value


def loads_with_split_array(body: bytes, field: str, max_volumes: int) -> dict[str, Any]:
    """Like :func:`loads_object`, but a large body's top-level array ``field`` comes back as a
    list of raw JSON byte slices, one per element, parsed later one at a time.

    One ``orjson.loads`` of a 150 MB batch holds the GIL for ~1 s, which would stall the event
    loop (and ``/health``); element by element, the parsing thread yields every few ms. Bodies
    under :data:`SPLIT_THRESHOLD_BYTES`, or any body this scan cannot vouch for, take the plain
    path, which also produces the exact error messages.
    """
    if len(body) >= SPLIT_THRESHOLD_BYTES:
        split = _split_top_level_array(body, field, max_volumes)
        if split is not None:
            return split
    return loads_object(body)


#: Bodies at least this large have their volume array parsed element by element.
SPLIT_THRESHOLD_BYTES = 8 * 1024**2
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def _split_top_level_array(body: bytes, field: str, max_volumes: int) -> dict[str, Any] | None:
    data = np.frombuffer(body, np.uint8)
    if (data == ord("\\")).any():
        return None  # escaped quotes would need a real tokenizer
    quotes = np.flatnonzero(data == ord('"'))
    if len(quotes) % 2:
        return None
    brackets = np.flatnonzero(np.isin(data, _OPEN) | np.isin(data, _CLOSE))
    if len(quotes):  # drop brackets inside strings: between quote 2k and quote 2k+1
        inside = np.searchsorted(quotes, brackets) % 2 == 1
        brackets = brackets[~inside]
    if not len(brackets):
        return None
    step = np.where(np.isin(data[brackets], _OPEN), 1, -1)
    depth = np.cumsum(step)  # depth just after each bracket
    if depth.min() < 0 or depth[-1] != 0 or data[brackets[0]] != ord("{"):
        return None
    key = body.find(b'"' + field.encode() + b'"')
    if key < 0 or body.find(b'"' + field.encode() + b'"', key + 1) >= 0:
        return None
    at = np.searchsorted(brackets, key)
    if at == 0 or depth[at - 1] != 1:
        return None  # the key is not at the top level
    colon = body[key + len(field) + 2:brackets[at]].strip()
    if colon != b":" or data[brackets[at]] != ord("["):
        return None
    start = at  # the array's own '[' (depth 2 after it)
    close = start + 1 + int(np.argmax(depth[start + 1:] == 1))
    if depth[close] != 1:
        return None
    inner = slice(start + 1, close)
    opens = brackets[inner][(depth[inner] == 3) & (step[inner] == 1)]
    ends = brackets[inner][(depth[inner] == 2) & (step[inner] == -1)]
    if len(opens) != len(ends):
        return None
    if len(opens) > max_volumes:  # before a slice is made of each
        raise PayloadTooLarge(f"{field} holds {len(opens)} volumes; at most {max_volumes} are "
                              f"accepted per request", field=field)
    pieces = [body[a:b + 1] for a, b in zip(opens.tolist(), ends.tolist())]
    edges = [brackets[start] + 1, *[e + 1 for e in ends.tolist()]]
    gaps = [body[a:b] for a, b in zip(edges, [*opens.tolist(), brackets[close]])]
    if any(gap.strip() not in (b",", b"") for gap in gaps) or \
            sum(gap.strip() == b"," for gap in gaps) != max(0, len(pieces) - 1) or \
            (pieces and gaps[0].strip()) or (pieces and gaps[-1].strip()):
        return None  # something other than nested arrays in the array: plain path
    payload = loads_object(body[:brackets[start]] + b"[]" + body[brackets[close] + 1:])
    payload[field] = [_RawJSON(piece) for piece in pieces]
    return payload


class _RawJSON:
    """An element of a split array, still JSON text."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def numeric_array(value: Any, field: str, expected: str = "an array of numbers",
                  dtype: type = np.float32) -> np.ndarray:
    """Nested lists -> a ``dtype`` array of any shape; rejects ragged lists, non-numbers and
    values that are not finite in ``dtype`` (e.g. 1e39 in float32). Never echoes the value."""
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
        array = array.astype(dtype)
    if not np.isfinite(array).all():
        limit = "float32 range (|x| > 3.4e38)" if dtype == np.float32 else "range"
        raise InputError(f"{field} must be finite: a value is NaN, infinite or beyond "
                         f"{limit}", field=field)
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
        name = f"{field}[{i}]"
        out[i] = volume(loads_json(item.text, name) if isinstance(item, _RawJSON) else item, name, box)
    return out
