"""Helpers the perf benchmarks share: the machine, medians, peak memory, child processes.

Every figure these scripts print is a ratio of two sides measured one after the other in one
invocation on the same machine; absolute times on a shared machine mean little on their own.
"""
from __future__ import annotations

import atexit
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # measure the checkout these scripts belong to

RESULT_PREFIX = "PERF-RESULT "


def machine() -> str:
    """One line: cores, CPU model, torch version."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags()
    extras = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    vector = f"{torch.backends.cpu.get_cpu_capability()}{''.join(' + ' + e for e in extras)}"
    return (f"{os.cpu_count()} CPU cores ({model}, {vector}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); bf16 speed depends on them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def scratch_dir(prefix: str, given: str | None = None) -> Path:
    """The run's work folder: ``given`` (the user's, kept), else a new temporary one, removed
    when the run ends by any means short of being killed. A run leaves demo data, feature
    caches and packs there, up to 2 GB."""
    if given:
        return Path(given)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def one_epoch_config(pairs_file, work: Path, method: str, anchor: str = "", **options):
    """The ``TrainConfig`` the step benchmarks' children train with: one epoch of demo pairs
    (2 held out), batch 32 unless given, no checkpoints, a pack folder of its own under ``work``.
    ``mlilt`` is imported here, so a child that put another checkout first on its path gets it."""
    from mlilt.training.config import TrainConfig

    out = Path(tempfile.mkdtemp(dir=work)) / "pack"
    settings = {"epochs": 1, "batch_size": 32, "holdout": 2, "checkpoint_every": 0, **options}
    return TrainConfig(lang="sw", data=str(pairs_file), out=str(out), method=method, anchor=anchor or None, **settings)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def turn_order(cells: list, repeat: int) -> list:
    """``cells`` in order on even repeats, reversed on odd ones: a slow patch of a shared
    machine then falls on every cell alike, not on whichever runs first."""
    return cells if repeat % 2 == 0 else cells[::-1]


def steady(values: list[float], warmup: int) -> list[float]:
    """The values after the first ``warmup`` (allocator, caches and lazy init settle there)."""
    return values[warmup:] if len(values) > warmup else values[-1:]


def rss_mb() -> float:
    """Resident memory now, in MB (Linux /proc; 0 elsewhere)."""
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM, else ru_maxrss), in MB."""
    return status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start the VmHWM high-water mark again from the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, RssAnon, ...) in MB; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def emit(result: dict) -> None:
    """A child's result, one JSON line its parent picks out of the output."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``python script args`` and return the result it emitted; its output is echoed on failure."""
    command = [sys.executable, script, *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["_output"] = done.stdout + done.stderr
            return result
    sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
    raise RuntimeError(f"{' '.join(command)} exited {done.returncode} without a result")


def demo_data(root: Path, langs: list[str], n: int) -> Path:
    """Procedural demo pairs (``mlilt data demo``) under ``root``, reused when already there."""
    from mlilt.demo.data import generate_demo

    if not (root / langs[0] / "train.jsonl").is_file():
        generate_demo(root, langs, n=n)
    return root


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
