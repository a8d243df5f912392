"""Fingerprinting memory-mapped weights reads them through the file, never pages them in,
and still hashes exactly the bytes in memory."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest
import torch
from torch import nn

from mlilt.files.mapped_bytes import CHUNK, tensor_bytes
from mlilt.towers.base import weights_fingerprint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux memory maps")

SIZE = 3 * CHUNK // 4 + 7  # floats: three chunks of bytes and a partial fourth


def _mapped_tensor(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(a private memory map of a file of floats, the same floats in ordinary memory)."""
    values = torch.randn(SIZE, generator=torch.Generator().manual_seed(0))
    values.numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=SIZE, dtype=torch.float32), values


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    total, inside = 0, False
    for line in lines:
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _sha(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def test_mapped_weights_hash_through_the_file_and_stay_out_of_memory(tmp_path):
    mapped, values = _mapped_tensor(tmp_path / "weights.bin")
    assert _resident_kb(tmp_path / "weights.bin") < 1024  # nothing read yet
    chunks = list(tensor_bytes(mapped))
    assert len(chunks) == 4 and all(isinstance(chunk, bytes) for chunk in chunks)  # read from the file
    assert _sha(chunks) == _sha(tensor_bytes(values.clone()))
    assert _resident_kb(tmp_path / "weights.bin") < 1024  # still not paged in


def test_a_written_page_hashes_the_memory_not_the_file(tmp_path):
    mapped, values = _mapped_tensor(tmp_path / "weights.bin")
    mapped[SIZE // 2] = 12345.0  # copy-on-write: this page now differs from the file
    values[SIZE // 2] = 12345.0
    assert _sha(tensor_bytes(mapped)) == _sha(tensor_bytes(values))


def test_a_replaced_file_hashes_the_memory(tmp_path):
    path = tmp_path / "weights.bin"
    mapped, values = _mapped_tensor(path)
    os.replace(_write(tmp_path / "other.bin", torch.zeros(SIZE)), path)  # new inode under the old name
    assert _sha(tensor_bytes(mapped)) == _sha(tensor_bytes(values))


def _write(path, tensor):
    tensor.numpy().tofile(path)
    return path


def test_the_fingerprint_of_mapped_weights_is_the_fingerprint_of_the_same_weights_in_memory(tmp_path):
    mapped, values = _mapped_tensor(tmp_path / "weights.bin")
    on_file, in_memory = nn.Module(), nn.Module()
    on_file.weight, in_memory.weight = nn.Parameter(mapped, requires_grad=False), nn.Parameter(values)
    on_file.bias = in_memory.bias = nn.Parameter(torch.ones(3))
    assert weights_fingerprint(on_file, {"a": 1}) == weights_fingerprint(in_memory, {"a": 1})
    assert weights_fingerprint(on_file, {"a": 1}) != weights_fingerprint(in_memory, {"a": 2})
    assert _resident_kb(tmp_path / "weights.bin") < 1024
