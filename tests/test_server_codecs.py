"""Large JSON volumes are parsed a piece (a plane or a few) at a time, so the parsing thread
yields the GIL to the event loop: same numbers as one ``orjson.loads``, and for every kind of
bad volume the same status and message a small body gets. The same for /statistics' arrays of
any shape."""
from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cryolens.errors import CryoLensError
from cryolens.server import codecs, jsonscan, jsonwriter

BOX = (48, 48, 48)


def body_text(volumes: np.ndarray, field: str) -> bytes:
    return orjson.dumps({field: volumes, "use_segmented_decoder": False},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def plain_single(body: bytes):
    payload = codecs.loads_object(body)
    return codecs.volume(payload["input_volume"], "input_volume", BOX)[None]


def parse_single(body: bytes):
    assert len(body) >= codecs.PLANE_WISE_BYTES
    return codecs.read_json_volumes(body, "input_volume", BOX, 1, lambda payload: None)[1]


def plain_batch(body: bytes):
    payload = codecs.loads_object(body)
    return codecs.volumes(payload["input_volumes"], "input_volumes", BOX, 16)


def parse_batch(body: bytes):
    return codecs.read_json_volumes(body, "input_volumes", BOX, 16, lambda payload: None,
                                    batch=True)[1]


def outcome(parse, body: bytes):
    try:
        return parse(body)
    except CryoLensError as exc:
        return type(exc).__name__, getattr(exc, "field", None), str(exc)


@pytest.fixture(scope="module")
def volume():
    # values with few digits, so that each one below is one easy-to-find token
    return np.round(np.random.default_rng(4).standard_normal(BOX), 2).astype(np.float32) + 5


def test_planewise_numbers_equal_one_parse(volume, monkeypatch):
    body = body_text(volume, "input_volume")
    parsed, plain = [], codecs.loads_object
    monkeypatch.setattr(codecs, "loads_object", lambda text: parsed.append(len(text)) or
                        plain(text))
    parse_single(body)
    assert max(parsed) < 100  # only the options went through one orjson.loads
    monkeypatch.undo()
    options = []
    codecs.read_json_volumes(body, "input_volume", BOX, 1, options.append)
    assert options[0]["use_segmented_decoder"] is False
    assert np.array_equal(parse_single(body), plain_single(body))
    assert np.array_equal(parse_single(body)[0], volume)
    ints = orjson.dumps({"input_volume": np.arange(48**3).reshape(BOX).tolist()})
    assert np.array_equal(parse_single(ints), plain_single(ints))
    batch = body_text(np.stack([volume, -volume, volume * 3]), "input_volumes")
    assert np.array_equal(parse_batch(batch), plain_batch(batch))


def replace(old: bytes, new: bytes):
    return lambda text: text.replace(old, new, 1)


def drop_last_value_of_first_row(text: bytes) -> bytes:
    end = text.index(b"]")
    return text[:text.rindex(b",", 0, end)] + text[end:]


# each makes a different mistake in the (first) volume of a body
MISTAKES = {
    "boolean": replace(b"5.", b"true, 5."),  # also one value too many in that row
    "only a boolean": replace(b"[5.", b"[true,5."),
    "null": replace(b"5.", b"null,5."),
    "string": replace(b"5.", b'"5",5.'),
    "object": replace(b"5.", b"{},5."),
    "beyond float32": replace(b"5.", b"1e39,5."),
    "huge integer": replace(b"5.", b"1" + b"0" * 400 + b",5."),
    "nested deeper": replace(b"5.", b"[5],5."),
    "short row": drop_last_value_of_first_row,
    "missing comma": replace(b"]],[[", b"]] [["),
    "trailing comma": replace(b"]]]", b"]],]"),
    "extra plane": replace(b"]]]", b"]],[[1]]]"),
    "not a number": replace(b"5.", b"5.."),
    "unclosed": replace(b"]]]", b"]]"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_in_a_large_volume_is_named_as_in_a_small_body(volume, mistake):
    make = MISTAKES[mistake]
    body = body_text(volume, "input_volume")
    wrong = make(body)
    assert wrong != body
    got = outcome(parse_single, wrong)
    assert isinstance(got, tuple), f"{mistake}: accepted"
    assert got == outcome(plain_single, wrong)
    batch = body_text(np.stack([volume, volume]), "input_volumes")
    at = batch.index(b"]]],[[[") + 4  # the mistake goes into the second volume
    wrong = batch[:at] + make(batch[at:])
    got = outcome(parse_batch, wrong)
    assert isinstance(got, tuple) and got == outcome(plain_batch, wrong)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_in_a_huge_batch_is_named_per_volume(volume, mistake, monkeypatch):
    """Past SPLIT_THRESHOLD_BYTES a batch is never parsed whole: the volume at fault is named
    as if it had been parsed alone, plane-wise or not."""
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", codecs.PLANE_WISE_BYTES)
    batch = body_text(np.stack([volume, volume]), "input_volumes")
    at = batch.index(b"]]],[[[") + 4
    wrong = batch[:at] + MISTAKES[mistake](batch[at:])
    got = outcome(parse_batch, wrong)
    assert isinstance(got, tuple), f"{mistake}: accepted"
    second = wrong[at:wrong.rindex(b"]") ].rstrip()  # the second volume's own text
    if got[1] == "input_volumes[1]":  # a volume's mistake: as that volume parsed alone
        alone = outcome(lambda text: codecs.volume(codecs.loads_json(text, got[1]), got[1],
                                                   BOX, text), second)
        assert got == alone
    else:  # the batch itself is broken JSON (a missing comma, a stray bracket)
        assert got[0] == "MalformedBody" and got[1] == "body"


def test_missing_plane_and_wrong_plane_count(volume):
    for volumes in (volume[:47], np.concatenate([volume, volume[:1]])):
        body = body_text(volumes, "input_volume")
        got = outcome(parse_single, body)
        assert got == outcome(plain_single, body) and "shape (48, 48, 48)" in got[2]


def test_answers_written_row_by_row_are_orjsons_bytes(volume):
    """Big arrays (nested ones too, and views orjson cannot write natively) go out a row at a
    time, and the bytes are exactly one orjson.dumps of the whole answer."""
    payload = {"reconstruction": volume, "segmented_outputs": {"affinity": -volume,
                                                               "free": volume.T},
               "embedding": volume[0, 0, :40], "input_shape": [48, 48, 48], "n_volumes": 1,
               "empty": {}}
    whole = orjson.dumps(payload, default=np.ascontiguousarray,
                         option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    assert codecs.dumps(payload) == whole
    batch = {"reconstructions": np.stack([volume, volume]), "n_volumes": 2}
    assert codecs.dumps(batch) == orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY)


_ARRAYS = hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3),
).flatmap(lambda a: st.sampled_from([a, a.T, a[..., ::-1]]) if a.ndim else st.just(a))
_LEAVES = _ARRAYS | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, width=32) | \
    st.text(max_size=5) | st.none() | st.lists(st.integers(0, 9), max_size=3)
_ANSWERS = st.recursive(_LEAVES, lambda inner: st.dictionaries(
    st.text(max_size=4) | st.integers(0, 5), inner, max_size=4), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _ANSWERS, max_size=5))
def test_any_answer_written_row_by_row_is_orjsons_bytes(answer):
    """Whatever an answer holds (nested dicts, arrays of any dtype, shape and layout, with the
    row-wise threshold at zero so every array of two or more dimensions goes row by row), the
    bytes are one orjson.dumps of it."""
    whole = orjson.dumps(answer, default=np.ascontiguousarray,
                         option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonwriter, "ROW_WISE_BYTES", 0)
        assert codecs.dumps(answer) == whole


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_huge_body_is_judged_like_a_small_one_whatever_surrounds_its_volumes(volume, path,
                                                                               monkeypatch):
    """Past SPLIT_THRESHOLD_BYTES: a string value equal to the field's name is no second key,
    and an object where the volumes belong is a 422 naming the field (it was a 413 about the
    bytes "besides" the volumes, or "names input_volumes twice")."""
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", codecs.PLANE_WISE_BYTES)
    monkeypatch.setattr(jsonscan, "MAX_OPTIONS_BYTES", 1024)  # the object is larger than this
    field, parse, plain = (("input_volume", parse_single, plain_single) if path == "single"
                           else ("input_volumes", parse_batch, plain_batch))
    value = volume if path == "single" else volume[None]
    tagged = orjson.dumps({"tag": field, field: value, "note": f"{field} :"},
                          option=orjson.OPT_SERIALIZE_NUMPY)
    assert np.array_equal(parse(tagged), value.reshape(-1, *BOX))
    wrapped = orjson.dumps({"tag": field, field: {"a": value}}, option=orjson.OPT_SERIALIZE_NUMPY)
    got = outcome(parse, wrapped)
    assert got == outcome(plain, wrapped) and got[:2] == ("InputError", field), got
    assert "got an object" in got[2], got


def test_a_huge_body_for_one_volume_is_refused_without_parsing_it_whole(volume, monkeypatch):
    """A single-volume field holding 20 volumes (wrong shape) past SPLIT_THRESHOLD_BYTES: a
    422 that says why, not seconds of one orjson.loads and GBs of Python floats."""
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", 4 * codecs.PLANE_WISE_BYTES)
    monkeypatch.setattr(codecs, "MAX_VOLUME_JSON_BYTES", 4 * codecs.PLANE_WISE_BYTES)
    parsed, plain = [], codecs.loads_json
    monkeypatch.setattr(codecs, "loads_json", lambda text, field="body": parsed.append(
        len(text)) or plain(text, field))
    body = body_text(np.stack([volume] * 20), "input_volume")
    got = outcome(parse_single, body)
    assert got[:2] == ("InputError", "input_volume"), got
    assert "must be one volume of shape (48, 48, 48)" in got[2] and "bytes" in got[2], got
    assert max(parsed, default=0) < 100  # only the options went through orjson whole


# -- /statistics: arrays of any shape, read as the route reads them --------------------------
def parse_statistics(body: bytes, field: str = "volume"):
    return codecs.read_large_json(body, lambda text: codecs.loads_with_raw_field(text, field),
                                  lambda payload: codecs.array_of_numbers(payload[field], field))


def plain_statistics(body: bytes, field: str = "volume"):
    return codecs.numeric_array(codecs.loads_object(body)[field], field, dtype=np.float64)


@pytest.mark.parametrize("shape", [(70_000,), (350, 200), (35, 40, 50), (5, 7, 40, 50)])
@pytest.mark.parametrize("piece_bytes", [1, codecs.PIECE_BYTES])
def test_large_arrays_of_any_shape_read_in_pieces_equal_one_parse(shape, piece_bytes,
                                                                  monkeypatch):
    monkeypatch.setattr(jsonscan, "PIECE_BYTES", piece_bytes)  # 1: one element per piece
    parsed, loads_object = [], codecs.loads_object
    monkeypatch.setattr(codecs, "loads_object", lambda text: parsed.append(len(text)) or
                        loads_object(text))
    rng = np.random.default_rng(2)
    noise, ints = rng.standard_normal(shape), rng.integers(-999, 999, shape)
    mixed = noise.tolist()  # integers in some elements and floats in others
    mixed[: len(mixed) // 2] = ints[: len(mixed) // 2].tolist()
    for field, value in (("volume", noise), ("volume", ints), ("volume_data", mixed)):
        body = orjson.dumps({"note": "volume", field: value, "n": 1},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        assert len(body) >= codecs.PLANE_WISE_BYTES
        parsed.clear()
        got = parse_statistics(body, field)
        assert max(parsed) < 100  # only the other fields went through one orjson.loads
        assert got.dtype == np.float64 and got.shape == shape
        assert np.array_equal(got, plain_statistics(body, field))


def field_text(body: bytes, field: str = "volume") -> bytes:
    """The JSON text of ``field`` in a body made by :func:`body_text`."""
    return body[body.index(b"[", body.index(field.encode())):body.rindex(b',"use_segmented')]


def first_value(token: bytes):
    """Put ``token`` in place of the first number of a volume."""
    def make(text: bytes) -> bytes:
        at = text.index(b"[[[") + 3
        return text[:at] + token + text[min(text.index(b",", at), text.index(b"]", at)):]
    return make


# in place of a number, so that no row is ragged; 1e39 is no mistake in float64
STATISTICS_MISTAKES = {**MISTAKES, "null value": first_value(b"null"),
                       "boolean value": first_value(b"false"),
                       "string value": first_value(b'"5"'), "object value": first_value(b"{}"),
                       "no mistake in float64": first_value(b"1e39"),
                       "beyond float64": first_value(b"-1e400")}


@pytest.mark.parametrize("mistake", list(STATISTICS_MISTAKES))
def test_a_mistake_in_a_large_statistics_array_is_named_as_in_a_small_body(volume, mistake,
                                                                          monkeypatch):
    """Under SPLIT_THRESHOLD_BYTES as for a small body; past it, as the array parsed alone (or,
    for a body broken around it, a 400 naming the body). The same numbers when it is no
    mistake for float64 (1e39)."""
    wrong = STATISTICS_MISTAKES[mistake](body_text(volume, "volume"))
    plain = outcome(plain_statistics, wrong)
    got = outcome(parse_statistics, wrong)
    assert np.array_equal(got, plain) if isinstance(plain, np.ndarray) else got == plain
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", codecs.PLANE_WISE_BYTES)
    got = outcome(parse_statistics, wrong)
    if isinstance(plain, np.ndarray):
        assert np.array_equal(got, plain)
    elif got[1] == "volume":
        text = field_text(wrong)
        assert got == outcome(lambda t: codecs.numeric_array(
            codecs.loads_json(t, "volume"), "volume", dtype=np.float64, text=t), text)
    else:
        assert got[:2] == ("MalformedBody", "body"), got


def test_a_huge_bad_statistics_array_is_refused_without_parsing_it_whole(volume, monkeypatch):
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", codecs.PLANE_WISE_BYTES)
    monkeypatch.setattr(codecs, "MAX_VOLUME_JSON_BYTES", codecs.PLANE_WISE_BYTES)
    parsed, plain = [], codecs.loads_json
    monkeypatch.setattr(codecs, "loads_json", lambda text, field="body": parsed.append(
        len(text)) or plain(text, field))
    got = outcome(parse_statistics, first_value(b"null")(body_text(volume, "volume")))
    assert got[:2] == ("InputError", "volume"), got
    assert "not parsed whole" in got[2] and "null" in got[2], got
    assert max(parsed, default=0) < 100


#: Arrays read a piece at a time (or refused there and read whole): edge cases of the cutting.
EDGE_ARRAYS = [b"[1]", b"[ 1 ,\n2 ]", b"[-0, 1e-400, 1E2, 7]", b"[[1] ,\r\n [2]]", b"[[[1]],[[2]]]",
               b"[[], []]", b"[]", b"[ ]", b"[[1],5]", b"[5,[1]]", b"[[1],[2,3]]", b"[[1],,[2]]",
               b"[[1],[2],]", b"[,[1]]", b"[1,,2]", b"[1,2,]", b"[[[1]],[2]]", b"[1 2]",
               b"[[1] [2]]", b"[[1],[2]] ", b" [[1]]"]


@pytest.mark.parametrize("text", EDGE_ARRAYS)
@pytest.mark.parametrize("piece_bytes", [1, codecs.PIECE_BYTES])
def test_edge_arrays_in_a_large_body_are_judged_as_alone(text, piece_bytes, monkeypatch):
    monkeypatch.setattr(jsonscan, "PIECE_BYTES", piece_bytes)
    monkeypatch.setattr(codecs, "SPLIT_THRESHOLD_BYTES", codecs.PLANE_WISE_BYTES)
    body = b'{"pad": "' + b"x" * codecs.PLANE_WISE_BYTES + b'", "volume": ' + text + b"}"
    got = outcome(parse_statistics, body)
    alone = outcome(lambda t: codecs.numeric_array(codecs.loads_json(t, "volume"), "volume",
                                                   dtype=np.float64, text=t), text.strip())
    if isinstance(alone, np.ndarray):
        assert isinstance(got, np.ndarray) and got.shape == alone.shape
        assert np.array_equal(got, alone)
    else:
        assert got == alone
