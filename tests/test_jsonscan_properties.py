"""The streaming JSON scanner (``server/jsonscan.py``) against orjson, the library it stands in
for on large bodies: over generated JSON objects (strings holding brackets, quotes' neighbours
and the field's own name, the field nested deeper too, any whitespace), and with chunks and
pieces made tiny so that every boundary falls somewhere, what it reads equals one
``orjson.loads``."""
from __future__ import annotations

import re
from unittest import mock

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cryolens.errors import InputError, PayloadTooLarge
from cryolens.server import codecs, jsonscan

FIELD = "input_volumes"
# no backslash and no quote: orjson would escape them, and large bodies may hold no escapes
_TEXT = st.text(st.characters(blacklist_characters='\\"', blacklist_categories=("Cc", "Cs")),
                max_size=8) | st.sampled_from([FIELD, "[", "]", "{", "}", ",", ":", " [1, 2] ",
                                               f"{FIELD}:", "[[", "]]", "{}"])
_NUMBER = st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False)
_LEAF = _NUMBER | _TEXT | st.booleans() | st.none()
_KEY = _TEXT | st.just(FIELD)
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_KEY, inner, max_size=4), max_leaves=16)


@st.composite
def bodies(draw) -> bytes:
    """A JSON object with ``FIELD`` somewhere among its keys (or absent), holding anything."""
    others = draw(st.dictionaries(_TEXT.filter(lambda k: k != FIELD), _JSON, max_size=4))
    items = list(others.items())
    if draw(st.booleans()):
        volumes = draw(st.lists(_JSON, max_size=4) | _JSON)
        items.insert(draw(st.integers(0, len(items))), (FIELD, volumes))
    option = orjson.OPT_INDENT_2 if draw(st.booleans()) else 0
    return orjson.dumps(dict(items), option=option)


def _refused(body: bytes, whole: bool) -> bool:
    """Split into volumes, a top-level array of ``FIELD`` must hold only arrays (or objects,
    which the volume reader then names): anything else is a 422 naming its index."""
    value = orjson.loads(body).get(FIELD)
    return not whole and isinstance(value, list) and not all(
        isinstance(v, (list, dict)) for v in value)


def _named_too_often(body: bytes) -> bool:
    """The field's name followed by a colon (as a key) more than 16 times anywhere, which the
    scanner refuses outright (no body needs it; it bounds the scan's work)."""
    return len(re.findall(rb'"' + FIELD.encode() + rb'"\s*:', body)) > 16


def _expected(body: bytes) -> dict:
    """orjson's reading, except that an object where the volumes belong stands in empty (the
    options path then refuses it, however large it was)."""
    payload = orjson.loads(body)
    if isinstance(payload.get(FIELD), dict):
        payload[FIELD] = {}
    return payload


def _materialised(payload: dict) -> dict:
    value = payload.get(FIELD)
    if isinstance(value, jsonscan.RawJSON):
        payload[FIELD] = orjson.loads(bytes(value.text))
    elif isinstance(value, list) and all(isinstance(v, jsonscan.RawJSON) for v in value):
        payload[FIELD] = [orjson.loads(bytes(v.text)) for v in value]
    return payload


@settings(max_examples=300, deadline=None)
@given(body=bodies(), chunk=st.integers(1, 64), whole=st.booleans())
def test_a_split_body_reads_as_one_orjson_loads(body, chunk, whole):
    with mock.patch.object(jsonscan, "SCAN_CHUNK_BYTES", chunk):
        try:
            split = jsonscan.split_top_level_array(body, FIELD, None if whole else 16,
                                                   codecs.loads_object, whole)
        except InputError as exc:
            if _named_too_often(body):  # a guard of the scanner's own, before it reads further
                assert exc.field == "body" and "more than 16 times" in str(exc), exc
                return
            assert _refused(body, whole) and exc.field == FIELD, exc
            return
    assert not _refused(body, whole)
    assert _materialised(split) == _expected(body)


@settings(max_examples=100, deadline=None)
@given(body=bodies(), limit=st.integers(0, 3))
def test_more_volumes_than_allowed_are_refused_before_reading_them(body, limit):
    expected = orjson.loads(body).get(FIELD)
    try:
        split = jsonscan.split_top_level_array(body, FIELD, limit, codecs.loads_object)
    except PayloadTooLarge:
        assert isinstance(expected, list) and len(expected) > limit
        return
    except InputError:
        assert _refused(body, whole=False)
        return
    assert _materialised(split) == _expected(body)


_SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@settings(max_examples=200, deadline=None)
@given(shape=_SHAPES, floats=st.booleans(), piece=st.integers(1, 48), seed=st.integers(0, 99),
       indent=st.booleans())
def test_an_array_read_a_piece_at_a_time_equals_one_orjson_loads(shape, floats, piece, seed,
                                                                  indent):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 6) if floats
              else rng.integers(-10**6, 10**6, shape))
    text = orjson.dumps(values.tolist(), option=orjson.OPT_INDENT_2 if indent else 0)
    with mock.patch.object(jsonscan, "PIECE_BYTES", piece):
        read = jsonscan.read_pieces(memoryview(text), np.float32)
    want = np.asarray(orjson.loads(text), np.float32)
    assert read is not None and read.dtype == np.float32
    np.testing.assert_array_equal(read, want)


@settings(max_examples=200, deadline=None)
@given(value=_JSON, piece=st.integers(1, 48))
def test_anything_else_is_left_to_the_whole_parse(value, piece):
    """Whatever is not an array of numbers of equal-length lists comes back None (the caller
    then parses it whole, which names the mistake); what does come back is orjson's."""
    text = orjson.dumps(value)
    with mock.patch.object(jsonscan, "PIECE_BYTES", piece):
        read = jsonscan.read_pieces(memoryview(text), np.float64)
    if read is not None:
        np.testing.assert_array_equal(read, np.asarray(orjson.loads(text), np.float64))
