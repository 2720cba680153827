"""Returning freed memory to the system while a model is loaded and converted."""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch

MADV_DONTNEED = 4


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


def _file_mapping_holds(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a file (not the heap, a stack or anonymous memory)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= start and end <= hi:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return path.startswith("/")
    except OSError:
        pass
    return False


def drop_file_pages(t: torch.Tensor) -> None:
    """Take the pages of `t`, a CPU tensor read through a file mapping (safetensors), out of this process's
    memory once it has been copied: they stay in the page cache, and the mapping would otherwise count them
    until its last tensor is gone (0.6 GB of a 7B checkpoint's vision tower while its copies are made)."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() * t.element_size() < (1 << 20):
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not _file_mapping_holds(start, end):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
