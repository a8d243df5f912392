"""How large tensors get their memory while mlilt trains or evaluates (Linux).

Two settings, both for the activations a training step allocates and frees again every step:

- **Huge pages.** glibc's malloc gives every large block a mapping of its own and returns it
  to the kernel when it is freed, so every step takes a page fault for each 4 KiB of its
  activations, and the kernel zeroes each page: on the offline pair over a quarter of the CPU
  time of a ``vs_full.py`` run was the kernel's (benchmarks/perf/README.md). PyTorch can back
  allocations of 2 MiB and more with transparent huge pages (its ``THP_MEM_ALLOC_ENABLE``
  setting): one fault per 2 MiB instead of 512. PyTorch reads the setting once, so it takes
  effect only if no large tensor was allocated before.
- **A fixed mmap threshold of 16 MiB.** glibc raises its threshold to the size of each mapped
  block freed (up to 32 MiB), so after the first step blocks of up to 32 MiB live in the heap.
  Activations that die at different times leave holes there that later, differently sized
  ones do not fit. With the threshold fixed, blocks of 16 MiB and more are mapped and
  returned on free (on huge pages, one fault per 2 MiB): on the offline pair the peak of an
  ``ln`` step fell from 3,498 to 3,070 MB and that of a ``full`` step from 6,871 to 6,473 MB,
  for about 4% more step time on both (benchmarks/perf/README.md). Takes effect at once
  (glibc only; other C libraries are left alone).

Other settings cost more. Keeping every freed block in the heap (no mmap, no trim): PyTorch's
aligned allocations then never reuse a freed block of their own size, and the heap grows by
every step's activations (without huge pages, ``benchmarks/perf/kernel_time.py``: an ``ln`` step
spends 11% less CPU, none of it zeroing fresh pages, but peaked at 4.0 GB instead of 2.5 GB);
a lower threshold (4 MiB: 150 MB off an ``ln`` peak for 15% more CPU, all of it the kernel
zeroing pages); handing the heap's free memory back before every step (``malloc_trim``) of
every run: the steps that run the text tower only (anchored) took about a tenth longer,
faulting the same memory in again.

``return_free_memory`` trims the heap where a large object of many small blocks was just freed
for good (training hands the tokenizer back: ~250 MB of small Rust allocations), and before
each training step that runs the image tower: such a step allocates GBs and takes seconds, the
trim costs no measurable time there, and it took 270 MB off an ``ln`` peak
(``benchmarks/perf/kernel_time.py``, benchmarks/perf/README.md).

Both are process-wide, so only the ``mlilt`` command sets them (``mlilt.cli.main``, before any
tensor exists); library calls such as ``mlilt.training.train`` leave the allocator as the
caller set it. ``MLILT_MALLOC=default`` leaves both alone; ``MLILT_MALLOC=huge-pages`` sets huge
pages only. A user's own ``THP_MEM_ALLOC_ENABLE`` wins, and a kernel with transparent huge
pages off ignores it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

OPT_OUT = "MLILT_MALLOC"
TORCH_SETTING = "THP_MEM_ALLOC_ENABLE"
MMAP_THRESHOLD = 16 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def tune_allocator() -> bool:
    """Huge pages for large tensors and glibc's fixed mmap threshold, unless opted out;
    True if huge pages were asked for."""
    mode = os.environ.get(OPT_OUT, "").lower()
    if mode == "default":
        return False
    os.environ.setdefault(TORCH_SETTING, "1")
    if mode != "huge-pages":
        fix_mmap_threshold()
    return os.environ[TORCH_SETTING] == "1"


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every block of ``size`` bytes and more, for good; False off glibc."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, size) == 1


def return_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``), after a
    large, long-lived object of many small blocks was freed (a tokenizer). True if any was
    returned; False when none was, or off glibc."""
    libc = _glibc()
    return libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0) == 1


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
