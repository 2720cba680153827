"""Returning freed memory to the system while a model is loaded and converted."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere). Loading,
    fusing and converting a checkpoint frees many buffers of a few to a few hundred MB, which glibc
    otherwise keeps: 2.7 GB over a 7B model's load."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
