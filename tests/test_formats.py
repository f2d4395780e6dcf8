"""The .npy/.npz writers and the .npy reader against numpy's own: byte-for-byte the files
``np.save`` writes, archives that ``zipfile`` verifies and ``np.load`` reads back exactly."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from cryolens import formats
from cryolens.errors import MalformedBody

ARRAYS = {
    "embedding": np.arange(40, dtype=np.float32) / 7,
    "pose": np.array([0.1, -2.0, 3.5, 1e-30]),
    "global_weight": np.float32(0.25),  # 0-d stays 0-d
    "count": 3,
    "empty": np.zeros((0, 3), np.float32),
    "flags": np.array([True, False]),
    "big_endian": np.arange(5, dtype=">i2"),
    "strided": np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2],
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "größe": np.ones((1, 2, 1, 1), np.uint8),
    "complex": np.array([1 + 2j, -0.5j], np.complex64),
    "text": np.array(["ab", "c"]),
}


def numpy_save(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(ARRAYS))
def test_write_npy_is_numpys_file_and_reads_back(name):
    array = np.asarray(ARRAYS[name])
    body = formats.write_npy(array)
    assert body == numpy_save(array)
    if array.dtype.kind in "bcU":  # volumes are real numbers: anything else is a mistake
        with pytest.raises(formats.InputError, match="real numbers"):
            formats.read_npy(body)
        return
    back = formats.read_npy(body).data
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)


def test_npz_is_a_valid_zip_that_numpy_reads_exactly():
    body = formats.write_npz(ARRAYS)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None  # every member's CRC holds
        assert archive.namelist() == [f"{name}.npy" for name in ARRAYS]
    with np.load(io.BytesIO(body), allow_pickle=False) as loaded:
        for name, value in ARRAYS.items():
            value = np.asarray(value)
            assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
            assert np.array_equal(loaded[name], value)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_read_npz_reads_numpys_own_archives(save):
    buffer = io.BytesIO()
    save(buffer, **ARRAYS)
    back = formats.read_npz(buffer.getvalue())
    for name, value in ARRAYS.items():
        value = np.asarray(value)
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert np.array_equal(back[name], value) and back[name].flags.writeable


def test_read_npz_refuses_a_corrupt_member():
    body = bytearray(formats.write_npz({"embedding": ARRAYS["embedding"]}))
    body[len(body) // 2] ^= 0xFF  # a bit flipped inside the array data
    with pytest.raises(MalformedBody, match="'embedding.npy' is truncated or corrupt"):
        formats.read_npz(bytes(body))


def test_npz_parts_share_the_array_data_and_join_to_the_file():
    big = np.random.default_rng(0).standard_normal((4, 48, 48, 48)).astype(np.float32)
    parts = formats.npz_parts({"reconstructions": big})
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 1 and np.shares_memory(np.asarray(views[0]), big)
    assert formats.read_npz(b"".join(parts))["reconstructions"].tobytes() == big.tobytes()


def test_npz_beyond_zip32_falls_back_to_numpys_zip64_writer(monkeypatch):
    monkeypatch.setattr(formats, "_ZIP32_LIMIT", 0)
    back = formats.read_npz(formats.write_npz(ARRAYS))
    assert all(np.array_equal(back[name], np.asarray(v)) for name, v in ARRAYS.items())


@pytest.mark.parametrize("header", [
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
    b"{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",  # other writers' order
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,3)}",
])
def test_npy_headers_in_any_literal_layout_are_read(header):
    data = np.arange(6, dtype=np.float32)
    body = formats.NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header
    assert formats.read_npy(body + data.tobytes()).data.shape == (2, 3)


@pytest.mark.parametrize("header, fragment", [
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", "shape"),
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': 'x', }", "shape"),
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } and more", "header"),
    (b"{'descr': '|O', 'fortran_order': False, 'shape': (2, 3), }", "real numbers"),
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 3), }", "declares"),
])
def test_bad_npy_headers_name_the_problem(header, fragment):
    body = formats.NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises((MalformedBody, formats.InputError)) as error:
        formats.read_npy(body + bytes(24))
    assert fragment in str(error.value)


@pytest.mark.parametrize("shape, data, fragment", [
    ((2**62, 4), 0, "declares shape"),  # 2**64 elements: an int64 product wraps to 0
    ((2**62 + 6, 4), 24, "declares shape"),  # wraps to exactly the 24 bytes sent
    ((10**18, 10**18), 0, f"({4 * 10**36} bytes of data)"),  # not a negative wrapped count
    ((2**64,), 0, "declares shape"),
    ((0, 2**63), 0, "cannot make an array"),  # empty, yet beyond numpy's sizes
    ((0,) * 65, 0, "cannot make an array"),  # more dimensions than numpy has
])
def test_npy_shapes_beyond_numpy_are_refused_not_crashed(shape, data, fragment):
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    body = formats.NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(MalformedBody) as error:
        formats.read_npy(body + bytes(data))
    assert fragment in str(error.value)


def test_npy_fortran_order_must_be_a_bool():
    """numpy itself refuses any other value; taking "yes" as True would transpose the data."""
    header = b"{'descr': '<f4', 'fortran_order': 'yes', 'shape': (2, 3), }"
    body = formats.NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(MalformedBody, match=r"\(fortran_order is not a valid bool\)$"):
        formats.read_npy(body + bytes(24))


@pytest.mark.parametrize("cell, expected", [
    ((480.0, 480.0, 480.0), (10.0, 10.0, 10.0)),
    ((0.0, 0.0, 0.0), None),
    ((float("nan"),) * 3, None),
    ((float("inf"),) * 3, None),
    ((-480.0, -480.0, -480.0), None),
    ((480.0, 480.0, 0.0), None),
])
def test_mrc_voxel_size_is_known_only_when_positive_and_finite(tmp_path, cell, expected):
    import mrcfile

    path = tmp_path / "particle.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((48, 48, 48), np.float32))
        mrc.header.cella = cell
    assert formats.read_mrc(path.read_bytes()).voxel_size == expected
