"""The MRC and ``.npy`` readers against the libraries that define the formats, over generated
headers: whatever ``mrcfile`` (strict, its warnings taken as errors) or ``numpy.lib.format``
refuses is refused, and whatever is read is read as they read it. The few files they accept and
we refuse are named here (complex voxels, an empty map, an axis order that is not one, a
boolean or negative size, a dtype that is not real numbers, bytes past the declared data)."""
from __future__ import annotations

import io
import itertools
import os
import tempfile
import warnings

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from io_helpers import particle_stack, write_mrc
from mrcfile.dtypes import HEADER_DTYPE

from cryolens import formats
from cryolens.errors import InputError, MalformedBody
from cryolens.io import open_particles

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- MRC -------------------------------------------------------------------------------------
STAMPS = {"<": [b"\x44\x44\x00\x00", b"\x44\x41\x00\x00"], ">": [b"\x11\x11\x00\x00"]}
BAD_STAMPS = [b"\x00\x00\x00\x00", b"\x44\x00\x00\x00", b"\x11\x44\x00\x00", b"\x41\x44\x00\x00"]
SIZES = [-3, -1, 0, 1, 2, 3, 4, 2**31 - 1]


#: Values each header field may take in a generated file, most of them forbidden.
HOSTILE = {
    "nx": SIZES, "ny": SIZES, "nz": SIZES,
    "mode": [0, 1, 2, 3, 4, 6, 12, 5, 101, -1, 2**16],
    "nsymbt": [-2**31, -1024, -4, -1, 0, 4, 80, 10**6],  # mrcfile allocates what it says
    "ispg": [0, 1, 401, 630, 631, -1],
    "mz": [-1, 0, 1, 2, 3],
    "mapc": [0, 1, 2, 3, 4], "mapr": [0, 1, 2, 3, 4], "maps": [0, 1, 2, 3, 4],
    "map": [b"MAP ", b"MAP\0", b"MAPX", b"MA P", b"map ", b"\0\0\0\0"],
}


@st.composite
def mrc_files(draw) -> tuple[bytes, dict]:
    """An MRC file: a good header with up to three fields set to what the format forbids or
    allows only just, and a data block whose length is right, short or long."""
    order = draw(st.sampled_from("<>"))
    nz = draw(st.integers(1, 4))
    fields = {
        "nx": draw(st.integers(1, 4)), "ny": draw(st.integers(1, 4)), "nz": nz,
        "mode": draw(st.sampled_from([0, 1, 2, 6, 12])),
        "nsymbt": draw(st.sampled_from([0, 0, 8, 96])),
        "ispg": draw(st.sampled_from([0, 1, 401])),
        "mz": draw(st.sampled_from([d for d in (1, 2, 3, 4) if nz % d == 0])),
        "map": b"MAP ", "machst": draw(st.sampled_from(STAMPS[order])),
    }
    fields.update(zip(("mapc", "mapr", "maps"), draw(st.permutations([1, 2, 3])), strict=True))
    for key in draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=3, unique=True)):
        fields[key] = draw(st.sampled_from(HOSTILE[key]), label=key)
    if draw(st.integers(0, 9)) == 0:
        fields["machst"] = draw(st.sampled_from(BAD_STAMPS))
    header = np.zeros((), HEADER_DTYPE.newbyteorder(order))
    for key, value in fields.items():
        if key not in ("map", "machst"):
            header[key] = value
    header["mx"], header["my"], header["cella"] = 1, 1, (1.0, 1.0, 1.0)
    raw = bytearray(header.tobytes())
    raw[208:212], raw[212:216] = fields["map"], fields["machst"]
    itemsize = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}.get(fields["mode"], 4)
    declared = max(fields["nsymbt"], 0) + max(fields["nx"] * fields["ny"] * fields["nz"], 0) \
        * itemsize
    length = declared + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, -4, 16]))
    length = max(0, min(length, 4096))  # an impossible size stays impossible, written short
    data = draw(st.binary(min_size=min(length, 64), max_size=min(length, 64)))
    data = (data * (length // max(len(data), 1) + 1))[:length]
    return bytes(raw) + data, fields


def mrcfile_reads(body: bytes) -> np.ndarray | None:
    """mrcfile's strict reading of a file of these bytes (its warnings taken as errors), or
    None when it refuses."""
    handle, path = tempfile.mkstemp(suffix=".mrc")
    try:
        os.write(handle, body)
        os.close(handle)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with mrcfile.open(path, permissive=False) as mrc:
                return np.array(mrc.data)
    except Exception:  # noqa: BLE001 - a refusal, however mrcfile words (or raises) it
        return None
    finally:
        os.unlink(path)


def our_read(body: bytes) -> formats.Volumes | InputError:
    try:
        return formats.read_mrc(body)
    except InputError as exc:  # MalformedBody (400) or InputError (422)
        return exc


def particles_refuse(fields: dict) -> bool:
    """What mrcfile reads but particles cannot be: complex voxels, no voxels, no axis order."""
    return (fields["mode"] == 4 or 0 in (fields["nx"], fields["ny"], fields["nz"])
            or sorted((fields["mapc"], fields["mapr"], fields["maps"])) != [1, 2, 3])


@SETTINGS
@given(mrc_files())
def test_mrc_reader_refuses_what_mrcfile_refuses_and_reads_the_rest_alike(generated):
    body, fields = generated
    theirs, ours = mrcfile_reads(body), our_read(body)
    if theirs is None:
        assert isinstance(ours, InputError), f"mrcfile refuses {fields}, we read it"
        return
    if isinstance(ours, InputError):
        # a volume stack with nz < mz: mrcfile reads zero volumes of mz sections each
        nothing = theirs.size == 0
        assert particles_refuse(fields) or nothing, f"mrcfile reads {fields}, we refuse: {ours}"
        return
    assert not particles_refuse(fields)
    labels = (fields["maps"], fields["mapr"], fields["mapc"])
    to_zyx = [1 + labels.index(axis) for axis in (3, 2, 1)]
    got = ours.data.reshape(-1, *ours.data.shape[-3:])
    # the particles' stored shape (a stack of cubes may be grouped otherwise than mrcfile's
    # one map: the same voxels in the same order)
    stored = [0, 0, 0]
    for i, axis in enumerate(to_zyx):
        stored[axis - 1] = got.shape[1 + i]
    assert theirs.size == got.size
    expected = theirs.reshape(-1, *stored).transpose(0, *to_zyx)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == np.ascontiguousarray(expected).tobytes()


def good_mrc(tmp_path, **fields) -> bytes:
    path = write_mrc(tmp_path / "good.mrc", np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw, HEADER_DTYPE, count=1)[0].copy()
    for key, value in fields.items():
        header[key] = value
    raw[:1024] = header.tobytes()
    return bytes(raw)


@pytest.mark.parametrize("nsymbt", [-4, -1024, -2**31, 5000, 2**31 - 1])
def test_an_nsymbt_that_is_negative_or_past_the_end_is_named(tmp_path, nsymbt):
    """A negative extended header used to read voxels shifted by one header word (or 500)."""
    body = good_mrc(tmp_path, nsymbt=nsymbt)
    with pytest.raises(MalformedBody, match="header field nsymbt") as caught:
        formats.read_mrc(body)
    assert caught.value.field == "body"
    assert nsymbt > 10**6 or mrcfile_reads(body) is None  # mrcfile would allocate 2 GiB


def test_a_map_marker_of_map_nul_is_read_as_mrcfile_reads_it(tmp_path):
    body = bytearray(good_mrc(tmp_path))
    body[208:212] = b"MAP\0"
    volume = formats.read_mrc(bytes(body)).data
    assert np.array_equal(volume, mrcfile_reads(bytes(body)))
    assert volume.shape == (4, 5, 6)


@pytest.mark.parametrize(("fields", "named"), [
    ({"mode": 7}, "header field mode is 7"),
    ({"nx": -6}, "header fields nx, ny, nz"),
    ({"ispg": 401, "mz": 0}, "header field ispg 401"),
    ({"mapc": 1, "mapr": 1, "maps": 3}, r"axis order \(mapc, mapr, maps\)"),
])
def test_other_forbidden_header_fields_are_named(tmp_path, fields, named):
    with pytest.raises(MalformedBody, match=named):
        formats.read_mrc(good_mrc(tmp_path, **fields))


def test_embed_refuses_in_strict_mode_what_mrcfile_refuses_in_one_line(tmp_path, capsys):
    from server_helpers import small_model_file

    from cryolens.cli import main

    path = tmp_path / "shifted.mrc"
    path.write_bytes(good_mrc(tmp_path, nsymbt=-4, nx=48, ny=48, nz=48)[:1024]
                     + bytes(4 * 48**3 - 4))  # fits the file exactly when nsymbt is -4
    assert mrcfile_reads(path.read_bytes()) is None
    with pytest.raises(InputError, match=r"shifted.mrc: not a valid MRC file: header field "
                                         r"nsymbt .* is -4, negative"):
        open_particles(path)
    model = small_model_file(tmp_path / "small.safetensors")
    status = main(["embed", str(path), "-o", str(tmp_path / "out.parquet"), "-c", str(model),
                   "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and "nsymbt" in err and "Traceback" not in err


def test_a_longer_file_is_refused_as_mrcfile_warns_of_it(tmp_path):
    body = good_mrc(tmp_path) + b"\0" * 8
    with pytest.raises(MalformedBody, match="but the file holds"):
        formats.read_mrc(body)
    path = tmp_path / "long.mrc"
    path.write_bytes(body)
    with pytest.warns(RuntimeWarning, match="8 bytes larger than expected"):
        mrcfile.open(path, permissive=False).close()


def test_the_server_answers_a_bad_mrc_header_with_400_naming_the_field():
    from fastapi.testclient import TestClient

    from cryolens.server.app import create_app
    from cryolens.server.settings import Settings

    stack = particle_stack(1)[0]
    body = bytearray(1024) + stack.tobytes()
    header = np.zeros((), HEADER_DTYPE)
    header["nx"] = header["ny"] = header["nz"] = 48
    header["mode"], header["nsymbt"] = 2, -4
    header["mapc"], header["mapr"], header["maps"] = 1, 2, 3
    body[:1024] = header.tobytes()
    body[208:216] = b"MAP \x44\x44\x00\x00"
    body = bytes(body[:-4])  # the length a -4 extended header would fit
    app = create_app(Settings(checkpoint="demo", device="cpu"))
    with TestClient(app) as client:
        answer = client.post("/statistics", content=body,
                             headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 400, answer.text
    assert "nsymbt" in answer.json()["detail"] and answer.json()["field"] == "body"


# -- .npy ------------------------------------------------------------------------------------
DESCRS = ["'<f4'", "'>f8'", "'|u1'", "'<i2'", "'<f2'", "'<c8'", "'|b1'", "'|O'", "'<U3'",
          "'|S2'", "'<M8[s]'", "[('a', '<f4')]", "('<f4', (2,))", "'xyz'", "3", "None"]
SIZE_TEXTS = ["0", "1", "2", "3", "True", "False", "-1", "1.0", "'2'", "None", "(1,)", "2**2",
              "01", "0x2", "1_0"]


@st.composite
def npy_files(draw) -> tuple[bytes, dict]:
    """A ``.npy`` file whose header is numpy's own, or with up to three parts of it (version,
    dtype, sizes, the shape's form, fortran order, keys, spacing) odd or wrong, and whose data
    block is the declared length, or not."""
    odd = set(draw(st.lists(st.sampled_from(["version", "descr", "sizes", "shape", "fortran",
                                             "keys", "spacing"]), max_size=3, unique=True)))
    version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (1, 1), (4, 0)] if "version" in odd
                                   else [(1, 0), (2, 0), (3, 0)]))
    descr = draw(st.sampled_from(DESCRS if "descr" in odd else DESCRS[:5]))
    sizes = draw(st.lists(st.sampled_from(SIZE_TEXTS if "sizes" in odd else SIZE_TEXTS[:4]),
                          max_size=4))
    shape = "(" + "".join(f"{s}, " for s in sizes) + ")" if sizes else "()"
    if "shape" in odd:
        shape = draw(st.sampled_from([f"[{', '.join(sizes)}]", "3", "None", shape]))
    fortran = draw(st.sampled_from(["0", "1", "'True'", "None", "True"] if "fortran" in odd
                                   else ["True", "False"]))
    entries = [f"'descr': {descr}", f"'fortran_order': {fortran}", f"'shape': {shape}"]
    if "keys" in odd:
        if draw(st.booleans()):
            entries.pop(draw(st.integers(0, 2)))
        else:
            entries.append("'extra': 1")
    text = "{" + ", ".join(entries) + ", }"
    if "spacing" in odd:
        text = text.replace(", }", "}").replace(": ", ":")  # not numpy's exact spacing
    pad = -(6 + 2 + (2 if version[0] == 1 else 4) + len(text) + 1) % 64
    text = (text + " " * pad + "\n").encode("latin1")
    size = len(text).to_bytes(2 if version[0] == 1 else 4, "little")
    header = b"\x93NUMPY" + bytes(version) + size + text
    try:  # the length the header would declare, when it is readable at all
        declared = int(np.prod(eval(shape.replace("True", "1").replace("False", "0")))
                       * np.dtype(eval(descr)).itemsize)
    except Exception:  # noqa: BLE001
        declared = 16
    length = max(0, min(declared + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 8])), 512))
    data = draw(st.binary(min_size=length, max_size=length))
    return header + data, {"sizes": sizes, "descr": descr, "data": length}


def numpy_reads(body: bytes) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's own notices, e.g. Python 2 headers
            return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception:  # noqa: BLE001 - a refusal, however numpy words it
        return None


def only_we_refuse(fields: dict, theirs: np.ndarray) -> bool:
    """What numpy reads but volumes cannot be: a boolean or negative size, a dtype that is not
    real numbers (a structured or sub-array one too), or a data block of another length than
    declared."""
    odd_size = any(size in ("True", "False", "-1") for size in fields["sizes"])
    real = theirs.dtype.kind in "fiu" and theirs.dtype.fields is None and "(2,)" not in \
        fields["descr"]  # a sub-array dtype, which numpy reads as a last axis
    return odd_size or not real or fields["data"] != theirs.nbytes


@SETTINGS
@given(npy_files())
@example((b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }"
          + b" " * 53 + b"\n" + bytes(4), {"sizes": ["True"], "descr": "'<f4'", "data": 4}))
def test_npy_reader_refuses_what_numpy_refuses_and_reads_the_rest_alike(generated):
    body, fields = generated
    theirs = numpy_reads(body)
    try:
        ours = formats.read_npy(body).data
    except MalformedBody:
        ours = None
    except InputError as exc:  # the one 422: a dtype that is not real numbers
        assert "real numbers" in str(exc)
        ours = None
    if theirs is None:
        assert ours is None, f"numpy refuses {body[:120]!r}, we read it"
        return
    if ours is None:
        assert only_we_refuse(fields, theirs), f"numpy reads {body[:120]!r}, we refuse"
        return
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("shape", ["(True,)", "(False, 3)", "(-1,)", "(2, -2)", "(1.0,)"])
def test_a_shape_that_is_not_sizes_is_a_400_naming_the_shape(shape):
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(4)
    with pytest.raises(MalformedBody, match="shape") as caught:
        formats.read_npy(body)
    assert caught.value.field == "body"


def test_numpys_own_files_read_back_for_every_real_dtype():
    for dtype, fortran in itertools.product(["<f4", ">f8", "|u1", "|i1", "<i2", ">u2", "<f2",
                                             "<i8"], [False, True]):
        array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
        array = np.asfortranarray(array) if fortran else array
        buffer = io.BytesIO()
        np.save(buffer, array)
        back = formats.read_npy(buffer.getvalue()).data
        assert back.dtype == array.dtype and np.array_equal(back, array)


def test_the_server_answers_a_boolean_in_a_shape_with_400():
    from fastapi.testclient import TestClient

    from cryolens.server.app import create_app
    from cryolens.server.settings import Settings

    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }"
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + bytes(4)
    app = create_app(Settings(checkpoint="demo", device="cpu"))
    with TestClient(app) as client:
        answer = client.post("/statistics", content=body,
                             headers={"Content-Type": "application/x-npy"})
    assert answer.status_code == 400, answer.text
    assert "shape" in answer.json()["detail"]
