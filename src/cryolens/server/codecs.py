"""JSON in and out of the server: orjson for speed, numpy for checking volumes.

Volumes arrive as nested JSON lists; they are checked here (shape, numbers only, finite in
float32) so that the engine only ever sees well-formed ``float32`` arrays. Large bodies are
scanned by :mod:`cryolens.server.jsonscan`; answers are written by
:mod:`cryolens.server.jsonwriter` (both re-exported here).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson

from cryolens.errors import CryoLensError, InputError, MalformedBody, PayloadTooLarge
from cryolens.server.jsonscan import (
    JSON_WHITESPACE,
    MAX_MESSAGE_CHARS,
    MAX_OPTIONS_BYTES,
    NUMERIC_KINDS,
    PIECE_BYTES,
    SCAN_CHUNK_BYTES,
    RawJSON,
    json_type,
    names_key,
    read_pieces,
    split_top_level_array,
    truncate,
)
from cryolens.server.jsonwriter import JSON_MEDIA_TYPE, ROW_WISE_BYTES, dumps, is_json_content_type

T = TypeVar("T")


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
        raise InputError(f"request body must be a JSON object, got {json_type(value)}",
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
    parsed by ``split`` instead, which leaves its volumes as JSON text (:class:`RawJSON`) for
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
    ``planes`` is None) comes back unparsed, as a :class:`RawJSON` that :func:`volume` and
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


def _split_top_level_array(body: bytes, field: str, max_volumes: int | None,
                           whole: bool = False) -> dict[str, Any]:
    if body.find(b"\\") >= 0:
        # escapes make quote counting unsound; a big volume batch never needs them
        raise MalformedBody(f"body: a JSON body of {SPLIT_THRESHOLD_BYTES} bytes or more may "
                            "not contain backslash escapes; send large batches as .npy",
                            field="body")
    return split_top_level_array(body, field, max_volumes, loads_object, whole)


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
        raise InputError(f"{field} must be {expected}, got {json_type(value)}", field=field)
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{field} is ragged (nested lists of different lengths): expected "
                         f"{expected}", field=field) from None
    if array.dtype.kind == "b" or (array.dtype.kind in "fiu" and _has_boolean(value, text)):
        raise InputError(f"{field} must hold only numbers, no booleans (true/false); expected "
                         f"{expected}", field=field)
    if array.dtype.kind not in NUMERIC_KINDS:
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
    if isinstance(value, RawJSON):
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
                         f"{json_type(value)}", field=field)
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
    (:func:`read_pieces`). Whatever is not an array of numbers of shape ``box`` goes through
    :func:`volume` whole, which names the problem exactly as for a small body; the numbers are
    the same either way."""
    array = read_pieces(text, np.float32, box)
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
    if not isinstance(value, RawJSON):
        return numeric_array(value, field, dtype=dtype)
    array = read_pieces(value.text, dtype)
    if array is not None:
        return array
    if len(value.text) >= MAX_VOLUME_JSON_BYTES:
        raise InputError(
            f"{field} must be a non-empty array of finite numbers (nested lists of equal "
            f"lengths; no booleans, null, strings or objects), and this one is not; at "
            f"{len(value.text)} bytes its JSON is not parsed whole to say where", field=field)
    raw = bytes(value.text)
    return numeric_array(loads_json(raw, field), field, dtype=dtype, text=raw)


__all__ = [
    "JSON_MEDIA_TYPE",
    "JSON_WHITESPACE",
    "MAX_MESSAGE_CHARS",
    "MAX_OPTIONS_BYTES",
    "MAX_VOLUME_JSON_BYTES",
    "PIECE_BYTES",
    "PLANE_WISE_BYTES",
    "ROW_WISE_BYTES",
    "SCAN_CHUNK_BYTES",
    "SPLIT_THRESHOLD_BYTES",
    "array_of_numbers",
    "dumps",
    "is_json_content_type",
    "loads_json",
    "loads_object",
    "loads_with_raw_field",
    "loads_with_split_array",
    "names_key",
    "numeric_array",
    "read_json_volumes",
    "read_large_json",
    "truncate",
    "volume",
    "volume_from_json",
    "volumes",
]
