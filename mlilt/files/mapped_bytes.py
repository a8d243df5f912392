"""A tensor's bytes, read from the file it is mapped from when it is an unmodified view of one.

transformers (5.x) loads safetensors weights as private memory maps of the file: a page is
read in only when something touches it. Training a language pack touches the transformer
blocks and the rows of the embedding matrix its captions use, nothing more; hashing the
weights in memory for a tower's fingerprint would touch every page and keep it resident. With
the 250,002-piece XLM-R vocabulary that is the whole embedding matrix (me5-small: 384 MB;
xlm-roberta-base: 768 MB) for the rest of the process.

Reading the same bytes through the file instead goes through the page cache, which the
process's resident memory does not count. It is done only where it gives exactly the bytes
in memory: the tensor lies in a private mapping of a file that still has the mapped inode,
and none of its pages was written to (Linux ``/proc/self/pagemap``: every present page is
still the file's page, none is swapped). Anything else, and every other system, gives the
bytes in memory.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

CHUNK = 8 * 2**20  # bytes read per call: a bounded buffer, whatever the tensor's size
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    inode: int
    path: str


def tensor_bytes(tensor: torch.Tensor, mappings: list[Mapping] | None = None) -> Iterator[memoryview | bytes]:
    """The bytes of a contiguous CPU ``tensor`` in order, in chunks; from its file when that
    leaves its pages alone and gives the same bytes. ``mappings``: ``file_mappings()``, read
    once for many tensors."""
    nbytes = tensor.numel() * tensor.element_size()
    source = _file_source(tensor.data_ptr(), nbytes, file_mappings() if mappings is None else mappings)
    if source is None:
        yield tensor.reshape(-1).view(torch.uint8).numpy().data  # a view: no copy
        return
    path, offset = source
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < nbytes:
            chunk = os.pread(handle.fileno(), min(CHUNK, nbytes - done), offset + done)
            if not chunk:
                raise OSError(f"{path} ended while reading mapped weights")
            done += len(chunk)
            yield chunk


def file_mappings() -> list[Mapping]:
    """This process's private mappings of regular files (Linux); [] elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][3] != "p" or not fields[5].startswith("/") or fields[5].endswith(" (deleted)"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append(Mapping(start, end, int(fields[2], 16), int(fields[4]), fields[5]))
    return found


def _file_source(address: int, nbytes: int, mappings: list[Mapping]) -> tuple[str, int] | None:
    """(file, offset) holding exactly these bytes, or None."""
    if nbytes < CHUNK:  # small tensors: hashing them in memory pages in next to nothing
        return None
    mapping = next((m for m in mappings if m.start <= address and address + nbytes <= m.end), None)
    if mapping is None or not _same_file(mapping) or not _pages_untouched_or_unwritten(address, nbytes):
        return None
    return mapping.path, mapping.offset + address - mapping.start


def _same_file(mapping: Mapping) -> bool:
    try:
        return os.stat(mapping.path).st_ino == mapping.inode
    except OSError:
        return False


def _pages_untouched_or_unwritten(address: int, nbytes: int) -> bool:
    """No page of the range holds private data: each is absent or still the file's page."""
    first, last = address // _PAGE, (address + nbytes - 1) // _PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            entries = os.pread(pagemap.fileno(), (last - first + 1) * 8, first * 8)
    except OSError:
        return False
    if len(entries) != (last - first + 1) * 8:
        return False
    for (entry,) in struct.iter_unpack("<Q", entries):
        if entry & _SWAPPED or (entry & _PRESENT and not entry & _FILE_PAGE):
            return False
    return True
