"""Binary volumes on the wire: numpy's ``.npy``/``.npz`` and MRC, read from and written to bytes.

Shared by the server, the client and the console, so it needs only numpy (and ``mrcfile`` for
MRC, imported when used). Readers decide from the header, before allocating anything of the
declared size, whether the data is really there: a truncated or lying file is a
:class:`~cryolens.errors.MalformedBody` that says what is wrong.
"""
from __future__ import annotations

import ast
import io
from dataclasses import dataclass

import numpy as np

from cryolens.errors import InputError, MalformedBody

NPY_MEDIA_TYPE = "application/x-npy"
NPZ_MEDIA_TYPE = "application/x-npz"
MRC_MEDIA_TYPE = "application/octet-stream"
NPY_MAGIC = b"\x93NUMPY"
#: Longest ``.npy`` header accepted (numpy itself caps it at 10,000 bytes by default).
MAX_NPY_HEADER = 10_000
_MRC_HEADER_BYTES = 1024
#: MRC modes CryoLens reads: int8, int16, float32, (complex: no), uint16, float16.
_MRC_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
_REAL_KINDS = "fiu"


@dataclass
class Volumes:
    """Volumes read from a body: ``data`` (D, H, W) or (N, D, H, W) as sent (any real dtype),
    ``voxel_size`` in angstrom (x, y, z) when the format carries one, else None."""

    data: np.ndarray
    voxel_size: tuple[float, float, float] | None = None


def read_npy(body: bytes | memoryview, field: str = "body") -> Volumes:
    """One ``.npy`` array from bytes, checked against its header before it is trusted."""
    view = memoryview(body)
    if bytes(view[:6]) != NPY_MAGIC:
        raise MalformedBody(f"{field} is not a .npy file (no \\x93NUMPY magic)", field=field)
    if len(view) < 10:
        raise MalformedBody(f"{field} is a truncated .npy header", field=field)
    major = view[6]
    if major == 1:
        header_len, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise MalformedBody(f"{field}: unknown .npy format version {major}", field=field)
    if header_len > MAX_NPY_HEADER or start + header_len > len(view):
        raise MalformedBody(f"{field}: .npy header length {header_len} is beyond the body",
                            field=field)
    header = _npy_header(bytes(view[start:start + header_len]), field)
    dtype, shape, fortran = header
    offset = start + header_len
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = count * dtype.itemsize
    if len(view) - offset != expected:
        raise MalformedBody(
            f"{field}: the .npy header declares shape {shape} of {dtype.str} "
            f"({expected} bytes of data) but the body holds {len(view) - offset}", field=field)
    array = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return Volumes(array)


def _npy_header(text: bytes, field: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    try:
        header = ast.literal_eval(text.decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
        dtype = np.dtype(descr)
    except Exception:  # noqa: BLE001 - any unreadable header is the same client mistake
        raise MalformedBody(f"{field}: the .npy header cannot be read", field=field) from None
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise MalformedBody(f"{field}: the .npy shape {shape!r} is not a tuple of sizes",
                            field=field)
    if dtype.hasobject or dtype.kind not in _REAL_KINDS or dtype.fields is not None:
        raise InputError(f"{field} must hold real numbers (float or int), got dtype {dtype.str}",
                         field=field)
    return dtype, shape, bool(fortran)


def read_mrc(body: bytes | memoryview, field: str = "body") -> Volumes:
    """An MRC/MRCS file from bytes: (D, H, W) for one map, (N, D, H, W) for a stack (MRCS, or
    ispg 0 with nz > 1 read as a volume). The header is checked before the data is read."""
    import mrcfile
    from mrcfile.mrcinterpreter import MrcInterpreter

    view = memoryview(body)
    if len(view) < _MRC_HEADER_BYTES:
        raise MalformedBody(f"{field} is not an MRC file: {len(view)} bytes is shorter than "
                            f"the 1024-byte header", field=field)
    head = np.frombuffer(view[:_MRC_HEADER_BYTES], dtype=mrcfile.dtypes.HEADER_DTYPE)[0]
    if bytes(head["map"]) != b"MAP ":
        swapped = head.view(head.dtype.newbyteorder())  # big-endian files
        if bytes(swapped["map"]) == b"MAP ":
            head = swapped
        else:
            raise MalformedBody(f"{field} is not an MRC file (no 'MAP ' marker at byte 208)",
                                field=field)
    mode = int(head["mode"])
    if mode not in _MRC_MODES:
        raise InputError(f"{field}: MRC mode {mode} is not a real-valued volume (use mode 0, "
                         f"1, 2, 6 or 12)", field=field)
    dims = [int(head[k]) for k in ("nx", "ny", "nz")]
    if min(dims) <= 0:
        raise MalformedBody(f"{field}: MRC dimensions {dims} must be positive", field=field)
    expected = _MRC_HEADER_BYTES + int(head["nsymbt"]) + \
        int(np.prod(dims, dtype=np.int64)) * np.dtype(_MRC_MODES[mode]).itemsize
    if len(view) != expected:
        raise MalformedBody(f"{field}: the MRC header declares {dims[2]}x{dims[1]}x{dims[0]} "
                            f"voxels of mode {mode} ({expected} bytes with the header) but the "
                            f"body holds {len(view)}", field=field)
    try:
        mrc = MrcInterpreter(iostream=io.BytesIO(view), permissive=False)
    except Exception as exc:  # noqa: BLE001 - mrcfile's own message says what is wrong
        raise MalformedBody(f"{field}: not a valid MRC file: {exc}", field=field) from None
    data = mrc.data
    if mrc.is_image_stack() and data.shape[1:] == (data.shape[1],) * 2 and \
            data.shape[0] % data.shape[1] == 0 and data.shape[0] > data.shape[1]:
        # an MRCS of cubes written as one image stack: N*S images of S x S
        side = data.shape[1]
        data = data.reshape(-1, side, side, side)
    size = mrc.voxel_size
    voxel = (float(size.x), float(size.y), float(size.z))
    return Volumes(data, voxel if any(voxel) else None)


def sniff(body: bytes | memoryview, field: str = "body") -> Volumes:
    """``.npy`` or MRC, told apart by the npy magic."""
    if bytes(memoryview(body)[:6]) == NPY_MAGIC:
        return read_npy(body, field)
    return read_mrc(body, field)


def write_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_npz(arrays: dict[str, np.ndarray | float | int]) -> bytes:
    """Uncompressed ``.npz`` (float data compresses poorly; speed matters more)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def read_npz(body: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def write_mrc(path, volume: np.ndarray, voxel_size: float | tuple[float, float, float] = 10.0,
              origin: tuple[float, float, float] | None = None) -> None:
    """A float32 MRC file: one (D, H, W) map, or an (N, D, H, W) stack marked as a volume
    stack; ``voxel_size`` in angstrom, ``origin`` (x, y, z) in angstrom."""
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))  # 4-D: a volume stack
        mrc.voxel_size = voxel_size
        if origin is not None:
            mrc.header.origin = tuple(origin)
