"""A boolean mask over a large tensor kept as one bit per element.

The backward pass of a clamp (ReLU, ReLU6) needs only where its input lay strictly inside
the bounds. Kept as bits, that is 1/32 of the float32 tensor it stands for. The packing runs
in chunks whose temporaries stay in the CPU's cache: over a whole tensor at once the same
element-wise passes took twice as long (each fresh temporary faulted its pages in).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

CHUNK = 1 << 16  # elements per pass on a CPU (a GPU takes the whole tensor in one pass)
_SHIFTS = torch.arange(8, dtype=torch.uint8)
# 8 bytes of 0/1, read as one little-endian int64 and multiplied by this, put byte i's bit on
# bit 56 + i: the top byte is the 8 flags packed.
_GATHER = 0x0102040810204080


class InsideMask(NamedTuple):
    """Where low < y < high, a bit per element of ``y`` in its memory order."""
    bits: torch.Tensor
    shape: torch.Size
    layout: torch.memory_format

    @classmethod
    def of(cls, y: torch.Tensor, low: float, high: float) -> InsideMask:
        layout = memory_format(y)
        flat = _flat(y, layout)
        chunk = _chunk(flat)
        bits = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=y.device)
        ones = torch.ones((), dtype=y.dtype, device=y.device).expand(chunk)
        passed = torch.empty(chunk, dtype=y.dtype, device=y.device)
        flags = torch.empty(chunk, dtype=torch.bool, device=y.device)
        words = torch.empty(-(-chunk // 8), dtype=torch.int64, device=y.device)
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk]
            n = part.numel()
            # The clamp's own backward of ones: its mask by definition, in two passes where
            # low < y and y < high took three.
            torch.ops.aten.hardtanh_backward.grad_input(ones[:n], part, low, high, grad_input=passed[:n])
            inside = torch.ne(passed[:n], 0, out=flags[:n])
            if n % 8:  # the last chunk: padded to whole bytes
                inside = torch.cat([inside, inside.new_zeros(8 - n % 8)])
            packed = torch.mul(inside.view(torch.uint8).view(torch.int64), _GATHER, out=words[:inside.numel() // 8])
            bits[start // 8:start // 8 + packed.numel()] = packed.bitwise_right_shift_(56)
        return cls(bits, y.shape, layout)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` where the mask is set and 0 elsewhere: a new tensor in the mask's layout."""
        grad = grad.contiguous(memory_format=self.layout)
        out = torch.empty_like(grad, memory_format=self.layout)
        grad_flat, out_flat = _flat(grad, self.layout), _flat(out, self.layout)
        chunk, shifts = _chunk(grad_flat), _SHIFTS.to(grad.device)
        for start in range(0, grad_flat.numel(), chunk):
            n = min(chunk, grad_flat.numel() - start)
            bits = self.bits[start // 8:start // 8 + -(-n // 8)]
            inside = ((bits.unsqueeze(-1) >> shifts) & 1).view(-1)[:n].view(torch.bool)
            torch.mul(grad_flat[start:start + n], inside, out=out_flat[start:start + n])
        return out


def _chunk(flat: torch.Tensor) -> int:
    """Elements per pass: a multiple of 8, so that only the last chunk has a partial byte."""
    return CHUNK if flat.device.type == "cpu" else max(8, -(-flat.numel() // 8) * 8)


def memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous."""
    if (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def _flat(tensor: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``tensor``'s elements in the memory order of ``layout`` (a view where it is so laid out)."""
    if layout is torch.channels_last:
        return tensor.permute(0, 2, 3, 1).reshape(-1)
    return tensor.contiguous().view(-1)
