"""Handing the heap's free memory back to the kernel (glibc's ``malloc_trim``).

glibc keeps freed small blocks in its heap. Where a large object of many small blocks is freed
for good (training hands the tokenizer back: about 250 MB of small Rust allocations), training
returns that memory at once. Other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


def return_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``). True if any
    was returned; False when none was, or off glibc."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None
