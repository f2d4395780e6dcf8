"""JSON in and out of the server: orjson for speed, numpy for checking volumes.

Volumes arrive as nested JSON lists; they are checked here (shape, numbers only, finite in
float32) so that the engine only ever sees well-formed ``float32`` arrays. No Starlette here:
``responses.py`` wraps these bytes in HTTP responses.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from typing import Any, TypeVar

import numpy as np
import orjson

from cryolens.errors import CryoLensError, InputError, MalformedBody, PayloadTooLarge

T = TypeVar("T")
#: Longest piece of a parser message that goes back to the client.
MAX_MESSAGE_CHARS = 200
JSON_MEDIA_TYPE = "application/json"
_NUMERIC_KINDS = "fiu"  # float, signed and unsigned int: what a volume may hold


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


def read_json_volumes(body: bytes, field: str, box: tuple[int, ...], max_volumes: int,
                      options: Callable[[dict[str, Any]], T], *, batch: bool = False
                      ) -> tuple[T, np.ndarray]:
    """A JSON request body -> (``options(payload)``, its volumes as (N, *box) float32).

    ``field`` holds one volume, or with ``batch`` a list of them. ``options`` sees the payload
    (without the volumes parsed) before any volume is read, so a wrong option is named first.
    Bodies of :data:`PLANE_WISE_BYTES` or more are parsed a volume and a piece (a plane or a
    few) at a time (:func:`read_large_json`): a mistake in a body under
    :data:`SPLIT_THRESHOLD_BYTES` is named exactly as for a small body; larger bodies are
    never parsed whole (nor is a volume of :data:`MAX_VOLUME_JSON_BYTES` or more).
    """
    # no 'true'/'false' anywhere: the volumes need no boolean check of their own
    text = b"" if b"true" not in body and b"false" not in body else None

    def read(payload: dict[str, Any]) -> tuple[T, np.ndarray]:
        chosen = options(payload)
        if field not in payload:
            raise InputError(f"{field} is required", field=field)
        if batch:
            return chosen, volumes(payload[field], field, box, max_volumes, text)
        return chosen, volume(payload[field], field, box, text)[None]

    def split(body: bytes) -> dict[str, Any]:
        if batch:
            return loads_with_split_array(body, field, max_volumes)
        return loads_with_raw_field(body, field, box[0])

    return read_large_json(body, split, read)


def read_large_json(body: bytes, split: Callable[[bytes], dict[str, Any]],
                    read: Callable[[dict[str, Any]], T]) -> T:
    """``read(payload)`` of a JSON object body. A body of :data:`PLANE_WISE_BYTES` or more is
    parsed by ``split`` instead, which leaves its volumes as JSON text (:class:`_RawJSON`) for
    ``read`` to take a piece at a time; when that finds a mistake in a body under
    :data:`SPLIT_THRESHOLD_BYTES`, the body is parsed again whole, so the client hears of it
    exactly as for a small body. Larger bodies are never parsed whole."""
    if len(body) >= PLANE_WISE_BYTES:
        try:
            return read(split(body))
        except CryoLensError:
            if len(body) >= SPLIT_THRESHOLD_BYTES:
                raise
    return read(loads_object(body))


def loads_with_split_array(body: bytes, field: str, max_volumes: int) -> dict[str, Any]:
    """Like :func:`loads_object`, but a large body's top-level array ``field`` comes back as a
    list of raw JSON slices (views into ``body``, no copies), one per volume, parsed later one
    at a time by :func:`volumes`.

    One ``orjson.loads`` of a 150 MB batch holds the GIL for ~1 s and turns every number into a
    32-byte Python float (an empty list costs 56 bytes for its 3 bytes of JSON); element by
    element, the parsing thread yields every few ms and holds one volume of Python objects at a
    time. Bodies under :data:`PLANE_WISE_BYTES` take the plain path (and
    :func:`read_json_volumes` re-reads one under :data:`SPLIT_THRESHOLD_BYTES` whole when this
    path finds a mistake in it). Large bodies never do: :func:`_split_top_level_array` decides
    from a chunked scan, whose extra memory is a few chunks plus two ``max_volumes + 1`` index
    arrays, and refuses more than ``max_volumes`` volumes before any per-volume object exists.
    """
    if len(body) >= PLANE_WISE_BYTES:
        return _split_top_level_array(body, field, max_volumes)
    return loads_object(body)


def loads_with_raw_field(body: bytes, field: str, planes: int | None = None
                         ) -> dict[str, Any]:
    """Like :func:`loads_object`, but in a body of :data:`PLANE_WISE_BYTES` or more the value
    of ``field`` (an array: one volume of at most ``planes`` planes, or of any shape when
    ``planes`` is None) comes back unparsed, as a :class:`_RawJSON` that :func:`volume` and
    :func:`array_of_numbers` read a piece at a time. A body this path cannot read raises;
    :func:`read_large_json` then parses it whole, which names the mistake."""
    if len(body) >= PLANE_WISE_BYTES:
        return _split_top_level_array(body, field, planes, whole=True)
    return loads_object(body)


#: Bodies at least this large have their volume array parsed element by element.
SPLIT_THRESHOLD_BYTES = 8 * 1024**2
#: JSON volumes at least this large are parsed a piece at a time (:data:`PIECE_BYTES`): one
#: ``orjson.loads`` of a 1.2 MB particle holds the GIL ~9 ms and building its array ~6 ms
#: more, the event loop (``/health`` included) waiting meanwhile; a plane is ~0.3 ms.
PLANE_WISE_BYTES = 256 * 1024
#: One volume's JSON is never this large (a 48^3 volume of 25-character numbers is 2.8 MB):
#: a larger one is refused without parsing it whole.
MAX_VOLUME_JSON_BYTES = 8 * 1024**2
#: Bytes of a large body scanned per numpy pass (temporaries: ~25 bytes per scanned byte in
#: the worst case, a body made only of brackets).
SCAN_CHUNK_BYTES = 1024**2
#: In a large body, the JSON outside the volume array may not exceed this. It is parsed whole
#: into Python objects (~1.6x its size for numbers), so it is bounded; 16 MiB still admits the
#: fields other endpoints use (the README's body.json carries two 2.3 MB volumes beside the
#: batch).
MAX_OPTIONS_BYTES = 16 * 1024**2
#: JSON's own whitespace (RFC 8259); ``bytes.strip()`` would also take \x0b and \x0c.
JSON_WHITESPACE = b" \t\n\r"
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_LSQ, _RSQ, _LCURLY, _RCURLY = ord("["), ord("]"), ord("{"), ord("}")


def _split_top_level_array(body: bytes, field: str, max_volumes: int | None,
                           whole: bool = False) -> dict[str, Any]:
    if body.find(b"\\") >= 0:
        # escapes make quote counting unsound; a big volume batch never needs them
        raise MalformedBody(f"body: a JSON body of {SPLIT_THRESHOLD_BYTES} bytes or more may "
                            "not contain backslash escapes; send large batches as .npy",
                            field="body")
    start = _NON_SPACE.search(body)
    if start is None or body[start.start()] != _LCURLY:
        _not_an_object(body, start.start() if start else len(body))
    keys = _key_positions(body, field)
    scan = _Scan(keys, max_volumes, field)
    data = np.frombuffer(body, np.uint8)
    for offset in range(0, len(data), SCAN_CHUNK_BYTES):
        scan.feed(data[offset:offset + SCAN_CHUNK_BYTES], offset)
    if scan.array is not None:
        between = body[scan.key + len(field) + 2:scan.array].strip(JSON_WHITESPACE)
        if between != b":":
            scan.array = None  # the value is not an array: the options path answers
    if scan.array is not None and scan.close is None:
        raise MalformedBody(f"body is malformed JSON: the {field} "
                            f"{'object' if scan.is_object else 'array'} is never closed",
                            field="body")
    rest = body
    if scan.array is not None:
        # the value's text stands in empty; an object where volumes belong stays an object,
        # so that the options path names the mistake (422) however large it was
        empty = b"{}" if scan.is_object else b"[]"
        rest = body[:scan.array] + empty + body[scan.close + 1:]
        if scan.is_object:
            scan.array = None
    if len(rest) > MAX_OPTIONS_BYTES:
        raise PayloadTooLarge(
            f"body: a large JSON body may hold at most {MAX_OPTIONS_BYTES} bytes besides the "
            f"{field} array of volumes, got {len(rest)}", field="body")
    payload = loads_object(rest)
    if scan.array is None:
        return payload
    view = memoryview(body)
    if whole:
        payload[field] = _RawJSON(view[scan.array:scan.close + 1])
        return payload
    starts = scan.starts[:scan.count].tolist()
    ends = scan.ends[:scan.count].tolist()
    edges = [scan.array + 1, *[e + 1 for e in ends]]
    for i, (a, b) in enumerate(zip(edges, [*starts, scan.close], strict=True)):
        _check_gap(view[a:b], field, i, i == 0, i == len(starts))
    payload[field] = [_RawJSON(view[a:b + 1]) for a, b in zip(starts, ends, strict=True)]
    return payload


_NON_SPACE = re.compile(rb"[^ \t\n\r]")
_FIRST_BYTE_TYPE = {ord('"'): "a string", ord("["): "an array", ord("t"): "a boolean",
                    ord("f"): "a boolean", ord("n"): "null",
                    **{c: "a number" for c in b"-0123456789"}}


def _not_an_object(body: bytes, at: int) -> None:
    if at >= len(body):
        raise MalformedBody("body is empty: expected JSON", field="body")
    kind = _FIRST_BYTE_TYPE.get(body[at])
    if kind is None:
        raise MalformedBody(f"body is malformed JSON: unexpected character at byte {at}",
                            field="body")
    raise InputError(f"request body must be a JSON object, got {kind}", field="body")


def _key_positions(body: bytes, field: str, limit: int = 16) -> list[int]:
    """Where ``"field"`` occurs followed by a colon, as a key does (at which depth, and whether
    inside a string, the scan tells); at most ``limit``. A string value equal to the field's
    name is not followed by a colon in valid JSON."""
    found: list[int] = []
    at = _next_key(body, field, 0)
    while at >= 0:
        if len(found) == limit:
            raise MalformedBody(f"body names {field} more than {limit} times", field="body")
        found.append(at)
        at = _next_key(body, field, at + 1)
    return found


def names_key(body: bytes, key: str) -> bool:
    """Does the JSON text name ``key`` as a key anywhere (its quoted name, then a colon)?"""
    return _next_key(body, key, 0) >= 0


def _next_key(body: bytes, field: str, start: int) -> int:
    """The first ``"field"`` from ``start`` on that is followed by a colon, or -1."""
    needle = b'"' + field.encode() + b'"'
    at = _find(body, needle, start)
    while at >= 0:
        after = at + len(needle)
        while body[after:after + 1] in _WHITESPACE_BYTES:
            after += 1
        if body[after:after + 1] == b":":
            return at
        at = _find(body, needle, at + 1)
    return -1


def _find(body: bytes, needle: bytes, start: int) -> int:
    """``body.find(needle, start)`` a :data:`SCAN_CHUNK_BYTES` window at a time: one search
    through a 200 MB body held the GIL (and the event loop) ~100 ms. (bytes.find: twice as
    fast as a regular expression here.)"""
    for low in range(start, len(body), SCAN_CHUNK_BYTES):
        at = body.find(needle, low, low + SCAN_CHUNK_BYTES + len(needle) - 1)
        if at >= 0:
            return at
    return -1


#: Each JSON whitespace byte on its own (``b"" in`` a tuple is False: the end of the body).
_WHITESPACE_BYTES = tuple(bytes([c]) for c in JSON_WHITESPACE)


def _check_gap(gap: memoryview, field: str, index: int, first: bool, last: bool) -> None:
    """Between two volumes: a comma and JSON whitespace; before the first or after the last:
    whitespace only. Anything else is a non-list element (422) or broken JSON (400)."""
    text = bytes(gap).strip(JSON_WHITESPACE)
    if text == (b"" if first or last else b","):
        return
    if not text:
        raise MalformedBody(f"body is malformed JSON: a comma is missing between volumes "
                            f"{index - 1} and {index} of {field}", field="body")
    token = text.strip(b",").strip(JSON_WHITESPACE)
    if token:
        try:
            value = orjson.loads(b"[" + token + b"]")
        except orjson.JSONDecodeError:
            value = None
        if value:
            raise InputError(f"{field}[{index}] must be a list of volumes: found "
                             f"{_json_type(value[0])} among them", field=field)
    raise MalformedBody(f"body is malformed JSON: unexpected {truncate(repr(text), 40)} in "
                        f"{field} near volume {index}", field="body")


class _Scan:
    """Brackets and quotes of a body, a chunk at a time: nesting depth, string state, where the
    top-level key ``field`` and its array are, and each volume's first and last byte (none
    when ``max_volumes`` is None: the array is then only found, whatever it holds)."""

    def __init__(self, keys: list[int], max_volumes: int | None, field: str) -> None:
        self.keys = np.asarray(keys, np.int64)
        self.max_volumes, self.field = max_volumes, field
        self.depth, self.in_string = 0, 0
        self.key: int | None = None
        self.array: int | None = None
        self.close: int | None = None
        slots = 0 if max_volumes is None else max_volumes + 1
        self.starts = np.empty(slots, np.int64)
        self.ends = np.empty(slots, np.int64)
        self.count = self.ended = 0
        self.no_array = False
        self.is_object = False  # the key's value is an object (only its end is tracked)

    def feed(self, chunk: np.ndarray, offset: int) -> None:
        quotes = np.flatnonzero(chunk == _QUOTE)
        brackets = np.flatnonzero((chunk == _LSQ) | (chunk == _RSQ) |
                                  (chunk == _LCURLY) | (chunk == _RCURLY))
        if len(quotes):
            outside = (np.searchsorted(quotes, brackets) + self.in_string) % 2 == 0
            brackets = brackets[outside]
        kinds = chunk[brackets]
        step = np.where((kinds == _LSQ) | (kinds == _LCURLY), 1, -1).astype(np.int32)
        after = self.depth + np.cumsum(step, dtype=np.int64)
        if len(after) and after.min() < 0:
            raise MalformedBody("body is malformed JSON: a closing bracket has no opening one",
                                field="body")
        here = (self.keys >= offset) & (self.keys < offset + len(chunk))
        for key in (self.keys[here] - offset).tolist():
            self._key(key + offset, quotes, brackets, after, key)
        if self.key is not None and self.array is None and not self.no_array:
            later = np.flatnonzero(brackets + offset > self.key)
            if len(later):
                self.array = int(brackets[later[0]]) + offset
                self.is_object = bool(kinds[later[0]] == _LCURLY)
                if kinds[later[0]] not in (_LSQ, _LCURLY) or after[later[0]] != 2:
                    self.array, self.no_array = None, True
        if self.array is not None and self.close is None:
            self._volumes(brackets + offset, step, after)
        self.depth = int(after[-1]) if len(after) else self.depth
        self.in_string = (self.in_string + len(quotes)) % 2

    def _key(self, at: int, quotes, brackets, after, local: int) -> None:
        if (np.searchsorted(quotes, local) + self.in_string) % 2:
            return  # inside a string
        before = np.searchsorted(brackets, local)
        depth = int(after[before - 1]) if before else self.depth
        if depth != 1:
            return
        if self.key is not None:
            raise MalformedBody(f"body names {self.field} twice", field="body")
        self.key = at

    def _volumes(self, positions, step, after) -> None:
        inside = positions > self.array
        closing = np.flatnonzero(inside & (after == 1))
        if len(closing):
            inside &= positions < positions[closing[0]]
            self.close = int(positions[closing[0]])
        if self.is_object or self.max_volumes is None:
            return
        opens = positions[inside & (step == 1) & (after == 3)]
        ends = positions[inside & (step == -1) & (after == 2)]
        if self.count + len(opens) > self.max_volumes:
            raise PayloadTooLarge(
                f"{self.field} holds more than {self.max_volumes} volumes; at most "
                f"{self.max_volumes} are accepted per request", field=self.field)
        self.starts[self.count:self.count + len(opens)] = opens
        self.ends[self.ended:self.ended + len(ends)] = ends
        self.count += len(opens)
        self.ended += len(ends)

class _RawJSON:
    """An element of a split array, still JSON text (a view into the body)."""

    __slots__ = ("text",)

    def __init__(self, text: memoryview) -> None:
        self.text = text


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def numeric_array(value: Any, field: str, expected: str = "an array of numbers",
                  dtype: type = np.float32, text: bytes | memoryview | None = None
                  ) -> np.ndarray:
    """Nested lists -> a ``dtype`` array of any shape; rejects ragged lists, non-numbers
    (booleans too: numpy would quietly read ``true`` as 1.0) and values that are not finite in
    ``dtype`` (e.g. 1e39 in float32). ``text``: the JSON the value came from, when at hand (the
    boolean check then reads it instead of re-serialising the value). Never echoes the value."""
    if isinstance(value, (str, bool, dict)) or value is None:
        raise InputError(f"{field} must be {expected}, got {_json_type(value)}", field=field)
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{field} is ragged (nested lists of different lengths): expected "
                         f"{expected}", field=field) from None
    if array.dtype.kind == "b" or (array.dtype.kind in "fiu" and _has_boolean(value, text)):
        raise InputError(f"{field} must hold only numbers, no booleans (true/false); expected "
                         f"{expected}", field=field)
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


def _has_boolean(value: Any, text: bytes | memoryview | None) -> bool:
    """Did a list of numbers hold ``true`` or ``false``? Numbers never contain a 't' or an 'f'
    in JSON, and strings were refused before this is asked."""
    if not isinstance(value, list):
        return False
    if text is None:
        text = orjson.dumps(value)
    raw = bytes(text) if isinstance(text, memoryview) else text
    return b"t" in raw or b"f" in raw


def volume(value: Any, field: str, box: tuple[int, ...],
           text: bytes | memoryview | None = None) -> np.ndarray:
    """One particle: a nested list of exactly ``box`` shape -> ``box`` float32 array."""
    if isinstance(value, _RawJSON):
        return volume_from_json(value.text, field, box)
    expected = f"a {'x'.join(map(str, box))} nested list of numbers, shape {_shape_text(box)}"
    array = numeric_array(value, field, expected, text=text)
    if array.shape != box:
        raise InputError(f"{field} must have shape {_shape_text(box)}, got "
                         f"{_shape_text(array.shape)}", field=field)
    return array


def volumes(value: Any, field: str, box: tuple[int, ...], max_volumes: int,
            text: bytes | None = None) -> np.ndarray:
    """A batch: a list of particles -> (N, *box) float32, naming the first bad one by index.
    The output is allocated once the first volume is known to be good."""
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
    out = None
    for i, item in enumerate(value):
        one = volume(item, f"{field}[{i}]", box, text)  # raw JSON: a piece at a time
        if out is None:
            out = np.empty((len(value), *box), np.float32)
        out[i] = one
    return out


def volume_from_json(text: memoryview, field: str, box: tuple[int, ...]) -> np.ndarray:
    """One particle from its JSON text, a piece (a plane or a few) at a time
    (:func:`_read_pieces`). Whatever is not an array of numbers of shape ``box`` goes through
    :func:`volume` whole, which names the problem exactly as for a small body; the numbers are
    the same either way."""
    array = _read_pieces(text, np.float32, box)
    if array is not None:
        return array
    if len(text) >= MAX_VOLUME_JSON_BYTES:  # parsed whole, it would take seconds and GBs
        raise InputError(
            f"{field} must be one volume of shape {_shape_text(box)}, but its JSON is "
            f"{len(text)} bytes, more than one volume ever takes (a few MB)", field=field)
    raw = bytes(text)
    return volume(loads_json(raw, field), field, box, raw)


def array_of_numbers(value: Any, field: str, dtype: type = np.float64) -> np.ndarray:
    """A non-empty array of numbers of any shape (nested lists, or their JSON text from a large
    body) -> a ``dtype`` array, checked as by :func:`numeric_array`. JSON text is read a piece
    at a time; text that is not such an array is parsed whole, to name the mistake exactly as
    for a small body, unless it is :data:`MAX_VOLUME_JSON_BYTES` or more: then it is refused
    without parsing it whole (every such array that is well formed reads piece by piece)."""
    if not isinstance(value, _RawJSON):
        return numeric_array(value, field, dtype=dtype)
    array = _read_pieces(value.text, dtype)
    if array is not None:
        return array
    if len(value.text) >= MAX_VOLUME_JSON_BYTES:
        raise InputError(
            f"{field} must be a non-empty array of finite numbers (nested lists of equal "
            f"lengths; no booleans, null, strings or objects), and this one is not; at "
            f"{len(value.text)} bytes its JSON is not parsed whole to say where", field=field)
    raw = bytes(value.text)
    return numeric_array(loads_json(raw, field), field, dtype=dtype, text=raw)


#: A large JSON array is parsed about this many bytes at a time: whole elements (a plane of a
#: volume, or a few), cut at the array's own commas, so that no piece holds the GIL for long.
PIECE_BYTES = 64 * 1024
_COMMA = ord(",")


def _read_pieces(text: memoryview, dtype: type, shape: tuple[int, ...] | None = None
                 ) -> np.ndarray | None:
    """The JSON array ``text`` (from its ``[`` to the matching ``]``, as :class:`_RawJSON`
    holds) as one ``dtype`` array, parsed a piece at a time: elements between two of the
    array's own commas, in brackets, through one ``orjson.loads`` and ``np.array``. The thread
    yields the GIL between pieces and holds one piece of Python objects at once. None when the
    text is not a non-empty array of numbers of equal-length lists (strings, objects,
    booleans, null, ragged, not finite in ``dtype``) or, given ``shape``, not of that shape:
    the caller then reads it whole, which names the mistake."""
    cuts = _piece_cuts(text)
    if cuts is None:
        return None
    edges, count = cuts
    if shape is not None and count != shape[0]:
        return None
    out: np.ndarray | None = None
    filled = 0
    for start, end in pairwise(edges):
        piece = b"".join((b"[", text[start + 1:end], b"]"))
        if b"t" in piece or b"f" in piece:  # numbers never hold a 't' or an 'f': a boolean
            return None
        # a piece with a fraction or an exponent anywhere is float64 in numpy's own reading
        # too; saying so up front makes np.array 40 % faster (a null becomes NaN: see below)
        floats = b"." in piece or b"e" in piece or b"E" in piece
        try:
            part = np.array(orjson.loads(piece), dtype=np.float64 if floats else None)
        except (orjson.JSONDecodeError, ValueError, TypeError, OverflowError):
            return None
        if part.dtype.kind not in _NUMERIC_KINDS or not len(part):
            return None
        if out is None:
            rest = part.shape[1:] if shape is None else shape[1:]
            out = np.empty((count, *rest), dtype)
        if part.shape[1:] != out.shape[1:] or filled + len(part) > count:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            out[filled:filled + len(part)] = part  # as numeric_array's astype
        filled += len(part)
    if out is None or filled != count or not np.isfinite(out).all():
        return None
    return out


def _piece_cuts(text: memoryview) -> tuple[list[int], int] | None:
    """Where :func:`_read_pieces` cuts the JSON array ``text``: its opening bracket, the comma
    after the last element that ends in each :data:`PIECE_BYTES` of text, and its closing
    bracket; and how many elements it has. The elements are arrays when the first one is (the
    planes of a volume: only brackets are looked at), else numbers (then the array holds no
    other bracket, and its commas are the cuts). Scanned :data:`SCAN_CHUNK_BYTES` at a time.
    None when the text holds a string or an object, or is not one such array."""
    data = np.frombuffer(text, np.uint8)
    if len(data) < 2 or data[0] != _LSQ or data[-1] != _RSQ:
        return None
    nested = data[_NON_SPACE.search(text, 1).start()] == _LSQ
    edges, count, depth = [0], 0 if nested else 1, 0
    for offset in range(0, len(data), SCAN_CHUNK_BYTES):
        chunk = data[offset:offset + SCAN_CHUNK_BYTES]
        if (chunk == _QUOTE).any() or (chunk == _LCURLY).any():
            return None
        brackets = np.flatnonzero((chunk == _LSQ) | (chunk == _RSQ))
        opening = chunk[brackets] == _LSQ
        after = depth + np.cumsum(np.where(opening, 1, -1), dtype=np.int64)
        closed = np.flatnonzero(after < 1)
        if len(closed) and (len(closed) > 1 or brackets[closed[0]] + offset != len(data) - 1):
            return None  # the array closes before its last byte
        depth = int(after[-1]) if len(after) else depth
        if nested:
            ends = brackets[~opening & (after == 1)] + offset  # each element's last byte
            count += len(ends)
            cuts = [_comma_after(data, end) for end in _last_per_window(ends).tolist()]
            if None in cuts:
                return None
            edges.extend(cut for cut in cuts if cut != len(data) - 1)
        else:
            if len(brackets) > (offset == 0) + (offset + len(chunk) == len(data)):
                return None  # a bracket inside an array of numbers
            commas = np.flatnonzero(chunk == _COMMA) + offset
            count += len(commas)
            edges.extend(_last_per_window(commas).tolist())
    edges.append(len(data) - 1)
    return edges, count


def _last_per_window(positions: np.ndarray) -> np.ndarray:
    """The last of ``positions`` (ascending) in each :data:`PIECE_BYTES` of text (a chunk of
    :data:`SCAN_CHUNK_BYTES`, a multiple, holds whole windows)."""
    window = positions // PIECE_BYTES
    return positions[np.append(window[1:] != window[:-1], True)] if len(positions) else positions


def _comma_after(data: np.ndarray, end: int) -> int | None:
    """The comma that follows an element ending at ``end`` (JSON whitespace between), the
    array's closing bracket when it was the last one, else None."""
    at = end + 1
    while at < len(data) - 1 and int(data[at]) in JSON_WHITESPACE:
        at += 1
    return at if data[at] == _COMMA or at == len(data) - 1 else None
