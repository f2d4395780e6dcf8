"""The streaming JSON scanner: a large request body read without parsing it whole.

A body of a few hundred MB is scanned a chunk at a time with numpy (brackets, quotes, the
top-level key of the volumes), so that its volume array can be cut into per-volume slices of
JSON text (:class:`RawJSON`, views into the body) and each of those read a piece at a time
(:func:`read_pieces`): the reading thread yields the GIL often and holds one piece of Python
objects at once. The checks on what the numbers mean live in :mod:`cryolens.server.codecs`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import orjson

from cryolens.errors import InputError, MalformedBody, PayloadTooLarge

#: Longest piece of a parser message that goes back to the client.
MAX_MESSAGE_CHARS = 200
NUMERIC_KINDS = "fiu"  # float, signed and unsigned int: what a volume may hold

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
_QUOTE = ord('"')
_LSQ, _RSQ, _LCURLY, _RCURLY = ord("["), ord("]"), ord("{"), ord("}")


def split_top_level_array(body: bytes, field: str, max_volumes: int | None,
                          parse: Callable[[bytes], dict[str, Any]], whole: bool = False
                          ) -> dict[str, Any]:
    """The JSON object ``body`` parsed by ``parse``, except its top-level array ``field``: a
    list of :class:`RawJSON`, one per volume (at most ``max_volumes``), or with ``whole`` one
    :class:`RawJSON` of the entire array. The body may not hold backslash escapes (they make
    quote counting unsound; the caller refuses them)."""
    start = _NON_SPACE.search(body)
    if start is None or body[start.start()] != _LCURLY:
        _not_an_object(body, start.start() if start else len(body))
    keys = _key_positions(body, field)
    scan = _Scan(body, keys, max_volumes, field)
    data = np.frombuffer(body, np.uint8)
    for offset in range(0, len(data), SCAN_CHUNK_BYTES):
        scan.feed(data[offset:offset + SCAN_CHUNK_BYTES], offset)
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
    payload = parse(rest)
    if scan.array is None:
        return payload
    view = memoryview(body)
    if whole:
        payload[field] = RawJSON(view[scan.array:scan.close + 1])
        return payload
    starts = scan.starts[:scan.count].tolist()
    ends = scan.ends[:scan.count].tolist()
    edges = [scan.array + 1, *[e + 1 for e in ends]]
    for i, (a, b) in enumerate(zip(edges, [*starts, scan.close], strict=True)):
        _check_gap(view[a:b], field, i, i == 0, i == len(starts))
    payload[field] = [RawJSON(view[a:b + 1]) for a, b in zip(starts, ends, strict=True)]
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
                             f"{json_type(value[0])} among them", field=field)
    raise MalformedBody(f"body is malformed JSON: unexpected {truncate(repr(text), 40)} in "
                        f"{field} near volume {index}", field="body")


class _Scan:
    """Brackets and quotes of a body, a chunk at a time: nesting depth, string state, where the
    top-level key ``field`` and its array are, and each volume's first and last byte (none
    when ``max_volumes`` is None: the array is then only found, whatever it holds)."""

    def __init__(self, body: bytes, keys: list[int], max_volumes: int | None, field: str
                 ) -> None:
        self.body = body
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
        # a chunk without a quote may lie wholly inside a string: its brackets are text
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
                # the key's value, not a later key's: only a colon between them (else the
                # value is not an array, and the options path answers)
                between = self.body[self.key + len(self.field) + 2:self.array]
                if (kinds[later[0]] not in (_LSQ, _LCURLY) or after[later[0]] != 2
                        or between.strip(JSON_WHITESPACE) != b":"):
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


class RawJSON:
    """An element of a split array, still JSON text (a view into the body)."""

    __slots__ = ("text",)

    def __init__(self, text: memoryview) -> None:
        self.text = text


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


#: A large JSON array is parsed about this many bytes at a time: whole elements (a plane of a
#: volume, or a few), cut at the array's own commas, so that no piece holds the GIL for long.
PIECE_BYTES = 64 * 1024
_COMMA = ord(",")


def read_pieces(text: memoryview, dtype: type, shape: tuple[int, ...] | None = None
                 ) -> np.ndarray | None:
    """The JSON array ``text`` (from its ``[`` to the matching ``]``, as :class:`RawJSON`
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
        if part.dtype.kind not in NUMERIC_KINDS or not len(part):
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
    """Where :func:`read_pieces` cuts the JSON array ``text``: its opening bracket, the comma
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
