"""glibc's heap, set for batches of large arrays: :func:`tune` once per process, :func:`trim`
to give freed memory back.

By default glibc serves every block over a threshold with its own ``mmap`` and unmaps it when
freed; the threshold starts at 128 KiB and rises with the largest block freed, and a heap's free
top goes back to the system past twice that. A batch of particles allocates and frees tens of
MB a call (volumes, z-scored copies, convolution activations), so depending on what the process
freed before, the same memory can be given back and faulted in again page by page on every
call. The server fell into that: 1.7-2.0 million page faults in 10 s of 16 clients, 40 % of its
CPU time in the kernel, half the requests per second it serves with the heap tuned.
:func:`tune` fixes the thresholds where that stops: blocks up to 32 MiB (the most glibc allows)
come from the heap, and a heap keeps up to 64 MiB of free top; what is freed beyond that still
goes back, and :func:`trim` returns the rest when the caller chooses (the server does so once a
second while it works and when it falls idle).

Both are process-wide, so nothing here runs at import: the server calls :func:`tune` when it
starts, as does the ``cryolens`` command; a library user calls it at the start of a script.
Elsewhere than glibc (musl, macOS, Windows) both do nothing and return False.
"""
from __future__ import annotations

import ctypes
import functools
import os

#: Blocks up to this size come from the heap instead of a fresh ``mmap`` each time.
MMAP_THRESHOLD = 32 * 2**20
#: A heap keeps up to this much free memory at its top instead of returning it at each free.
TRIM_THRESHOLD = 64 * 2**20
#: Environment variables through which a user has already chosen these (theirs win).
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


@functools.cache
def _libc():
    """glibc, or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int] * 2, [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def user_chose() -> bool:
    """Whether the environment already sets glibc's malloc thresholds."""
    return any(os.environ.get(name) for name in USER_SETTINGS) or \
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def tune() -> bool:
    """Set the thresholds above for this process, unless the environment sets malloc's own
    (then those stand). True when set; False where there is no glibc or the user chose."""
    libc = _libc()
    if libc is None or user_chose():
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> bool:
    """Return the heaps' free memory to the system (glibc's ``malloc_trim(0)``). True when
    glibc gave any back."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
