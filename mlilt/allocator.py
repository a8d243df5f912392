"""Large tensors on transparent huge pages while mlilt trains or evaluates (Linux).

glibc's malloc gives every large block a mapping of its own and returns it to the kernel
when it is freed. A training step allocates the same activations every step, so every step
takes a page fault for each 4 KiB of them, and the kernel zeroes each page: on the offline
pair over a quarter of the CPU time of a ``vs_full.py`` run was the kernel's
(benchmarks/perf/README.md, "Huge pages for large tensors"). PyTorch can back allocations
of 2 MiB and more with transparent huge pages (its ``THP_MEM_ALLOC_ENABLE`` setting): one
fault per 2 MiB instead of 512.

Keeping freed memory in the heap instead (glibc ``mallopt``: no mmap, no trim) was tried
and rejected: PyTorch's aligned allocations then never reuse a freed block of their own
size, and the heap grew by every step's activations.

Set by the ``mlilt`` command and by ``mlilt.train.train``; it takes effect if no large tensor
was allocated before (PyTorch reads the setting once). ``MLILT_MALLOC=default`` leaves
PyTorch's allocation alone; a kernel with transparent huge pages off ignores it.
"""
from __future__ import annotations

import os

OPT_OUT = "MLILT_MALLOC"
TORCH_SETTING = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Ask PyTorch for huge-page-backed large tensors (a user's own setting wins); True if asked."""
    if os.environ.get(OPT_OUT, "").lower() == "default":
        return False
    os.environ.setdefault(TORCH_SETTING, "1")
    return os.environ[TORCH_SETTING] == "1"
