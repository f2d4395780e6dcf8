"""Binary volumes on the wire: numpy's ``.npy``/``.npz`` and MRC, read from and written to bytes.

Shared by the server, the client and the console, so it needs only numpy (and ``mrcfile`` for
MRC, imported when used). Readers decide from the header, before allocating anything of the
declared size, whether the data is really there: a truncated or lying file is a
:class:`~cryolens.errors.MalformedBody` that says what is wrong.
"""
from __future__ import annotations

import functools
import io
import math
import re
import struct
import zlib
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
#: MRC modes that hold real voxels: int8, int16, float32, uint16, float16.
_MRC_MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
#: MRC modes of complex voxels (int16 and float32 pairs): well-formed, but not particles.
_MRC_COMPLEX_MODES = (3, 4)
_REAL_KINDS = "fiu"


@dataclass
class Volumes:
    """Volumes read from a body: ``data`` (D, H, W) or (N, D, H, W) as sent (any real dtype),
    ``voxel_size`` in angstrom (x, y, z) when the format carries one, else None."""

    data: np.ndarray
    voxel_size: tuple[float, float, float] | None = None


def read_npy(body: bytes | memoryview, field: str = "body") -> Volumes:
    """One ``.npy`` array from bytes, checked against its header before it is trusted.

    Refuses what ``numpy.lib.format`` refuses (magic, version, header length, keys, values),
    and also a shape that holds anything but non-negative ints (``True`` and ``-1`` pass
    numpy's header check), a dtype that is not real numbers, and a body of another length than
    the header declares. The data is a view of ``body``, never a copy."""
    view = memoryview(body)
    if bytes(view[:6]) != NPY_MAGIC:
        raise MalformedBody(f"{field} is not a .npy file (no \\x93NUMPY magic)", field=field)
    if len(view) < 10:
        raise MalformedBody(f"{field} is a truncated .npy header", field=field)
    major, minor = view[6], view[7]
    if major == 1:
        header_len, start = int.from_bytes(view[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(view[8:12], "little"), 12
    else:
        major = None
    if major is None or minor != 0:
        raise MalformedBody(f"{field}: unknown .npy format version {view[6]}.{view[7]} "
                            "(1.0, 2.0 and 3.0 are read)", field=field)
    if header_len > MAX_NPY_HEADER or start + header_len > len(view):
        raise MalformedBody(f"{field}: .npy header length {header_len} is beyond the body",
                            field=field)
    header = _npy_header(bytes(view[start:start + header_len]), major, field)
    dtype, shape, fortran = header
    offset = start + header_len
    count = math.prod(shape)  # Python ints: a lying shape cannot wrap around to the body's size
    expected = count * dtype.itemsize
    if len(view) - offset != expected:
        raise MalformedBody(
            f"{field}: the .npy header declares shape {shape} of {dtype.str} "
            f"({expected} bytes of data) but the body holds {len(view) - offset}", field=field)
    array = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    try:  # only an empty array can still have sizes or dimensions numpy cannot index
        array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise MalformedBody(f"{field}: numpy cannot make an array of the .npy shape {shape}: "
                            f"{exc}", field=field) from None
    return Volumes(array)


#: The header numpy itself writes, read without ``ast``: 5 us instead of numpy's 41 us
#: (``docs/benchmarks.md``), on the event loop for every small binary request.
_PLAIN_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z][0-9]{0,2})', 'fortran_order': (True|False), "
    rb"'shape': \(((?:(?:0|[1-9][0-9]{0,17}), ?)*(?:0|[1-9][0-9]{0,17})?)\), \} *\n?")


def _npy_header(text: bytes, major: int, field: str
                ) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran order) of a ``.npy`` header's text: the form numpy writes by a
    regular expression, anything else by ``numpy.lib.format`` itself."""
    try:
        plain = _PLAIN_NPY_HEADER.fullmatch(text)
        if plain:
            descr, fortran = plain[1].decode("ascii"), plain[2] == b"True"
            shape = tuple(int(n) for n in plain[3].split(b",") if n.strip())
            dtype = np.lib.format.descr_to_dtype(descr)
        else:
            if major == 3 and not text.isascii():  # numpy reads 3.0 as UTF-8, 2.0 as latin-1
                raise ValueError("a 3.0 header that is not ASCII")
            read = (np.lib.format.read_array_header_1_0 if major == 1
                    else np.lib.format.read_array_header_2_0)
            length = len(text).to_bytes(2 if major == 1 else 4, "little")
            shape, fortran, dtype = read(io.BytesIO(length + text),
                                         max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is the same client mistake
        # numpy's words up to the colon: after it numpy quotes the header, and inputs are
        # never echoed back
        reason = " ".join(str(exc).split(":", 1)[0].split())[:100] or type(exc).__name__
        raise MalformedBody(f"{field}: the .npy header cannot be read ({reason})",
                            field=field) from None
    # numpy lets True (an int) and negative sizes through; neither is the size of an axis
    if not all(type(n) is int and n >= 0 for n in shape):
        shown = repr(shape) if len(repr(shape)) <= 80 else repr(shape)[:77] + "..."
        raise MalformedBody(f"{field}: the .npy shape {shown} is not a tuple of sizes "
                            "(non-negative whole numbers)", field=field)
    if dtype.hasobject or dtype.kind not in _REAL_KINDS or dtype.fields is not None \
            or dtype.subdtype is not None:
        described = dtype.str if dtype.subdtype is None else \
            str(np.lib.format.dtype_to_descr(dtype))  # a sub-array: ('<f4', (2,))
        raise InputError(f"{field} must hold real numbers (float or int), got dtype "
                         f"{described}", field=field)
    return dtype, shape, fortran


class MrcModeError(ValueError):
    """A well-formed MRC file whose voxels are not real numbers (e.g. complex, mode 4)."""


@dataclass
class MrcLayout:
    """Where an MRC file's particles lie: ``count`` particles of ``shape`` voxels of ``dtype``
    (in the file's byte order) from byte ``offset``, stored as (sections, rows, columns);
    ``axes`` is the transpose that turns those into (z, y, x) (see :func:`mrc_axes`; (0, 1, 2)
    in the usual order, where ``shape`` is already z, y, x). ``header`` is mrcfile's header
    record (file byte order), ``voxel_size`` angstrom (x, y, z), or None unless each axis has
    a positive, finite one."""

    header: np.void
    dtype: np.dtype
    offset: int
    count: int
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float] | None
    axes: tuple[int, int, int] = (0, 1, 2)


def to_zyx(data: np.ndarray, axes: tuple[int, int, int]) -> np.ndarray:
    """Stored particles (their last three axes as in the file) as (z, y, x), by the transpose
    ``axes`` from :func:`mrc_axes`."""
    if axes == (0, 1, 2):
        return data
    lead = tuple(range(data.ndim - 3))
    return np.ascontiguousarray(data.transpose(*lead, *(len(lead) + a for a in axes)))


def mrc_voxel_sizes(header) -> tuple[float, float, float]:
    """Angstrom per voxel along x, y and z from an MRC header's cell and grid, as declared
    (0 where the grid is 0; the callers decide what counts as known)."""
    cella, grid = header["cella"], [int(header[k]) for k in ("mx", "my", "mz")]
    return tuple(float(cella[a]) / n if n > 0 else 0.0 for a, n in zip("xyz", grid, strict=True))


def mrc_axes(header) -> tuple[int, int, int]:
    """The transpose that takes an MRC map's stored (section, row, column) axes to (z, y, x),
    from the header's ``mapc``, ``mapr`` and ``maps`` (the axis, 1 = x, 2 = y, 3 = z, that
    columns, rows and sections run along). Raises ValueError unless they are a permutation of
    1, 2, 3."""
    labels = tuple(int(header[k]) for k in ("maps", "mapr", "mapc"))  # stored axes 0, 1, 2
    if sorted(labels) != [1, 2, 3]:
        raise ValueError(f"axis order (mapc, mapr, maps) = {labels[::-1]} is not a permutation "
                         "of 1, 2, 3")
    return tuple(labels.index(axis) for axis in (3, 2, 1))


def mrc_layout(head: bytes | memoryview | np.ndarray, size: int, name: str = "") -> MrcLayout:
    """Check an MRC header as ``mrcfile`` does in strict mode (``permissive=False``, its
    warnings taken as errors), before anything of the declared size is touched: a map ID
    starting 'MAP' (mrcfile reads 'MAP\\0' too), a known machine stamp, a known mode, an
    extended header (``nsymbt``) neither negative nor past the end, and a file of exactly the
    size the header declares (mrcfile warns of a longer one). Then what particles need and
    mrcfile does not check: real voxels (:class:`MrcModeError` for the complex modes 3 and 4),
    positive nx, ny, nz, a volume stack's nz a multiple of its mz, and an axis order (mapc,
    mapr, maps) that is a permutation of 1, 2, 3. ``head`` holds at least the first 1024
    bytes; ``name`` (the file's name) tells an ``.mrcs`` (see :func:`mrc_particles`). Raises
    ValueError naming the header field that is wrong."""
    from mrcfile.dtypes import HEADER_DTYPE

    if size < _MRC_HEADER_BYTES:
        raise ValueError(f"{size} bytes is shorter than the 1024-byte header")
    raw = np.frombuffer(memoryview(head)[:_MRC_HEADER_BYTES], np.uint8)
    if raw[208:211].tobytes() != b"MAP":
        raise ValueError("no 'MAP ' marker at byte 208 (header field map)")
    stamp = raw[212:214].tobytes()
    if stamp in (b"\x44\x44", b"\x44\x41"):
        order = "<"
    elif stamp == b"\x11\x11":
        order = ">"
    else:
        raise ValueError(f"unrecognised machine stamp {raw[212:216].tobytes()!r} (header field "
                         "machst)")
    header = raw.view(HEADER_DTYPE.newbyteorder(order))[0]
    mode = int(header["mode"])
    if mode in _MRC_COMPLEX_MODES:
        raise MrcModeError(f"MRC mode {mode} is not a real-valued volume (use mode 0, 1, 2, 6 "
                           "or 12)")
    if mode not in _MRC_MODES:
        raise ValueError(f"header field mode is {mode}, not an MRC mode (0, 1, 2, 6 or 12 "
                         "for real voxels)")
    nsymbt = int(header["nsymbt"])
    if nsymbt < 0:
        raise ValueError(f"header field nsymbt (extended header bytes) is {nsymbt}, negative")
    if _MRC_HEADER_BYTES + nsymbt > size:
        raise ValueError(f"header field nsymbt declares {nsymbt} bytes of extended header, past "
                         f"the end of the file's {size} bytes")
    nx, ny, nz = (int(header[k]) for k in ("nx", "ny", "nz"))
    if min(nx, ny, nz) <= 0:
        raise ValueError(f"header fields nx, ny, nz = {[nx, ny, nz]} must be positive")
    ispg, mz = int(header["ispg"]), int(header["mz"])
    if 401 <= ispg <= 630 and (mz <= 0 or nz % mz):
        raise ValueError(f"header field ispg {ispg} makes a volume stack, but nz {nz} is not a "
                         f"multiple of the volume depth mz {mz}")
    dtype = np.dtype(_MRC_MODES[mode]).newbyteorder(order)
    offset = _MRC_HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if size != expected:
        raise ValueError(f"the header declares {nz}x{ny}x{nx} voxels of mode {mode} ({expected} "
                         f"bytes with the header) but the file holds {size}")
    axes = mrc_axes(header)
    count, shape = mrc_particles(header, name)
    voxel = mrc_voxel_sizes(header)
    known = all(math.isfinite(v) and v > 0 for v in voxel)  # else unknown: zero, NaN, negative
    return MrcLayout(header, dtype, offset, count, shape, voxel if known else None, axes)


def mrc_particles(header, name: str = "") -> tuple[int, tuple[int, int, int]]:
    """(count, (z, y, x) shape) of the particles an MRC header describes: a volume stack
    (ispg 401-630) holds nz / mz volumes; cubes written as an image stack (an ``.mrcs``, or
    ispg 0, with nz a multiple of ny = nx) hold nz / ny; anything else is one map."""
    nx, ny, nz = (int(header[k]) for k in ("nx", "ny", "nz"))
    ispg, mz = int(header["ispg"]), int(header["mz"])
    if 401 <= ispg <= 630 and mz > 0 and nz % mz == 0:
        return nz // mz, (mz, ny, nx)
    if (ispg == 0 or name.lower().endswith(".mrcs")) and nx == ny and nz > ny and nz % ny == 0:
        return nz // ny, (ny, ny, nx)
    return 1, (nz, ny, nx)


def read_mrc(body: bytes | memoryview, field: str = "body", name: str = "") -> Volumes:
    """An MRC/MRCS file from bytes: (D, H, W) for one map, (N, D, H, W) for a stack, axes
    z, y, x whatever order the header's mapc, mapr and maps store them in. The header is
    checked (:func:`mrc_layout`) before the data is touched. ``name``: the file's name, when
    known (an ``.mrcs`` is a stack of images; see :func:`mrc_particles`)."""
    view = memoryview(body)
    try:
        layout = mrc_layout(view, len(view), name)
    except MrcModeError as exc:
        raise InputError(f"{field}: {exc}", field=field) from None
    except ValueError as exc:
        raise MalformedBody(f"{field} is not an MRC file that can be read: {exc}",
                            field=field) from None
    data = np.frombuffer(view, layout.dtype, count=layout.count * int(np.prod(layout.shape)),
                         offset=layout.offset).reshape(layout.count, *layout.shape)
    data = to_zyx(data, layout.axes)
    return Volumes(data if layout.count > 1 else data[0], layout.voxel_size)


def sniff(body: bytes | memoryview, field: str = "body", name: str = "") -> Volumes:
    """``.npy`` or MRC, told apart by the npy magic (``name``: the file's name, when known)."""
    if bytes(memoryview(body)[:6]) == NPY_MAGIC:
        return read_npy(body, field)
    return read_mrc(body, field, name)


def npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` (version 1.0) header of a C-contiguous ``array``, padded so the data
    starts on a 64-byte boundary as numpy writes it."""
    return _npy_header_for(array.dtype, tuple(array.shape))


@functools.lru_cache(maxsize=256)
def _npy_header_for(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    # cached: a server writes the same few headers for every answer (~2.5 us each otherwise)
    text = (f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, "
            f"'fortran_order': False, 'shape': {shape!r}, }}")
    pad = -(len(NPY_MAGIC) + 4 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def write_npy(array: np.ndarray) -> bytes:
    array = np.asarray(array, order="C")
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be written as .npy")
    return npy_header(array) + array.tobytes()


#: Zip record layouts (little-endian): local file header, central directory entry, end record.
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
#: An archive past this size, or with this many members, needs zip64: numpy's writer does it.
_ZIP32_LIMIT = 0xFFFF_FFFF - 2**20


def npz_parts(arrays: dict[str, np.ndarray | float | int]) -> list[bytes | memoryview]:
    """An uncompressed ``.npz`` (a stored zip of ``name.npy`` members, what ``np.savez``
    writes) as a list of pieces whose concatenation is the file; the array data pieces are
    views of the arrays, not copies. Float data compresses poorly and speed matters more."""
    members = {f"{name}.npy": np.asarray(value, order="C") for name, value in arrays.items()}
    total = sum(a.nbytes + 200 + 2 * len(n) for n, a in members.items())
    if total > _ZIP32_LIMIT or len(members) >= 0xFFFF or any(
            a.dtype.hasobject for a in members.values()):
        buffer = io.BytesIO()
        np.savez(buffer, **{n[:-4]: a for n, a in members.items()})
        return [buffer.getvalue()]
    parts: list[bytes | memoryview] = []
    central: list[bytes] = []
    offset = 0
    for name, array in members.items():
        encoded = name.encode("utf-8")
        header = npy_header(array)
        data = memoryview(array.reshape(-1).view(np.uint8))  # any dtype, as raw bytes
        crc = zlib.crc32(data, zlib.crc32(header))
        size = len(header) + len(data)
        flags = 0x800 if not encoded.isascii() else 0  # bit 11: the name is UTF-8
        # version 2.0 needed, no compression, DOS time/date of 1980-01-01 00:00
        local = _LOCAL.pack(0x04034B50, 20, flags, 0, 0, 0x21, crc, size, size, len(encoded), 0)
        parts += [local + encoded + header, data]
        central.append(_CENTRAL.pack(0x02014B50, 20, 20, flags, 0, 0, 0x21, crc, size, size,
                                     len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
        offset += len(local) + len(encoded) + size
    directory = b"".join(central)
    parts.append(directory + _END.pack(0x06054B50, 0, 0, len(central), len(central),
                                       len(directory), offset, 0))
    return [part for part in parts if len(part)]


def write_npz(arrays: dict[str, np.ndarray | float | int]) -> bytes:
    """Uncompressed ``.npz`` bytes (see :func:`npz_parts`)."""
    return b"".join(npz_parts(arrays))


def read_npz(body: bytes | memoryview) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, by name. A stored (uncompressed) archive, what the server
    writes, is read straight from its central directory (each array copied once, CRC checked);
    anything else (compressed, zip64, odd members) goes through ``np.load``."""
    try:
        return _read_stored_npz(memoryview(body))
    except _NotPlain:
        with np.load(io.BytesIO(bytes(body)), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


class _NotPlain(Exception):
    """An archive the direct reader leaves to ``np.load``."""


def _read_stored_npz(view: memoryview) -> dict[str, np.ndarray]:
    end = len(view) - _END.size
    if end < 0 or int.from_bytes(view[end:end + 4], "little") != 0x06054B50:
        raise _NotPlain  # a trailing comment or zip64: the slow path finds the record
    *_, count, _, _, start, _ = _END.unpack_from(view, end)
    out: dict[str, np.ndarray] = {}
    at = start
    for _ in range(count):
        if at + _CENTRAL.size > end:
            raise _NotPlain
        fields = _CENTRAL.unpack_from(view, at)
        method, crc, stored, plain, name_len, extra_len, comment_len = (
            fields[4], fields[7], fields[8], fields[9], fields[10], fields[11], fields[12])
        local_at = fields[16]
        name = bytes(view[at + _CENTRAL.size:at + _CENTRAL.size + name_len])
        at += _CENTRAL.size + name_len + extra_len + comment_len
        if method != 0 or stored != plain or not name.endswith(b".npy") or \
                0xFFFF_FFFF in (stored, local_at):  # compressed, or zip64 sizes
            raise _NotPlain
        if local_at + _LOCAL.size > len(view):
            raise _NotPlain
        local = _LOCAL.unpack_from(view, local_at)
        data_at = local_at + _LOCAL.size + local[9] + local[10]
        member = view[data_at:data_at + stored]
        if len(member) != stored or zlib.crc32(member) != crc:
            raise MalformedBody(f".npz member {name.decode('utf-8', 'replace')!r} is truncated "
                                "or corrupt (its size or CRC does not match)", field="body")
        try:
            array = read_npy(member, "body").data
        except (MalformedBody, InputError):  # booleans, say: numpy's reader decides
            raise _NotPlain from None
        out[name[:-4].decode("utf-8")] = array.copy()  # aligned, writable, owns its data
    return out


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
