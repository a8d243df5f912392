"""bfloat16 autocast for ``--bf16``, and the note when a CPU can only emulate it."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def autocast(bf16: bool, device: torch.device) -> contextlib.ExitStack:
    """bfloat16 autocast with ``--bf16``. On a CPU attention then runs PyTorch's math kernel:
    with the flash kernel, whose bf16 backward is slow on CPU, the text tower's forward and
    backward took 0.92 s in bf16 against 0.95 s in fp32 on an AMX CPU; with the math kernel,
    0.46 s (benchmarks/perf/levers.py)."""
    stack = contextlib.ExitStack()
    if bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu":
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
