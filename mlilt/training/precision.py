"""bfloat16 autocast for ``--bf16``, and the note when a CPU can only emulate it."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def autocast(bf16: bool, device: torch.device, math_attention: bool) -> contextlib.ExitStack:
    """bfloat16 autocast with ``--bf16``. With ``math_attention`` (the ``math-attention`` speed
    path), attention on a CPU then runs PyTorch's math kernel: the flash kernel's bf16 backward
    is slow there (``benchmarks/perf/speed_paths.py``)."""
    stack = contextlib.ExitStack()
    if bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu" and math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def warn_slow_bf16(bf16: bool, device: torch.device, console) -> None:
    """bf16 autocast on a CPU without bfloat16 instructions is emulated: measured 19x slower
    than fp32 on an AVX2 machine (benchmarks/perf/README.md). Say so rather than refuse."""
    if not bf16 or device.type != "cpu" or console is None:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        console.print(f"note: --bf16 on a CPU without bfloat16 instructions ({capability}) is emulated and "
                      f"much slower than fp32 here; it pays on GPUs and on CPUs with AVX512-BF16/AMX")
