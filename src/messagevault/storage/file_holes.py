"""Punching holes in a file: giving back the disk blocks under a byte range.

Trimming a stream frees the blocks below its first readable position
without moving a byte (positions are offsets and never change), which is
what Linux's ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` does:
the range reads as zeros and the file keeps its size. Python's ``os`` has no
``fallocate`` with flags (``posix_fallocate`` only allocates), and the PyPI
wrappers are unmaintained C extensions, so this calls libc through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import sys
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02
# Filesystems (and systems) that cannot punch holes say so with one of these.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP}


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's 64-bit ``fallocate``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks under ``[offset, offset + length)`` of ``fd``; False if unsupported.

    Whole filesystem blocks are freed; the bytes of a block only partly
    inside the range are zeroed. The file's size stays. ``OSError`` for any
    other failure (a read-only descriptor, I/O).
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    if length == 0:
        return True
    fallocate = _libc_fallocate()
    if fallocate is None:
        return False
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, f"fallocate(PUNCH_HOLE): {os.strerror(code)}")
