"""Where a training step's CPU time goes: user vs kernel, page faults, peak memory, per
allocator setting (and, optionally, per checkout of mlilt).

    python benchmarks/perf/kernel_time.py [--method ln] [--anchor PACK] [--settings 16M,4M,heap]
                                          [--trees PATH,...] [--pairs 500] [--repeats 2]

Each (checkout, setting) runs in its own process: one epoch of ``mlilt.training.train`` on the
demo pairs, batch 32, one torch thread; each step's user and system CPU seconds and minor
page faults (``getrusage``, taken by a training callback) are recorded, and the median after
the first two steps is reported with the process's peak resident set (VmHWM). The settings run in alternating order over
``--repeats`` so a noisy minute does not fall on one of them only.

Settings: ``16M`` is mlilt's own (huge pages, glibc mmap threshold 16 MiB); ``4M``/``2M``/...
the same with another threshold, and ``16M/4k`` without huge pages (4 KiB pages, PyTorch's
64-byte alignment instead of 2 MiB); ``heap`` keeps every block in glibc's heap (no mmap, no trim,
no huge pages: ``MALLOC_MMAP_MAX_=0``), so a step reuses memory instead of faulting fresh,
zeroed pages in. ``--trees`` measures other checkouts of this repository (``git worktree add``)
with the same driver: their ``mlilt`` is imported instead of this one.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, demo_data, emit, machine, one_epoch_config, peak_rss_mb, run_child, scratch_dir,  # noqa: E402
                     table, turn_order)

SMALL_PAGES = {"THP_MEM_ALLOC_ENABLE": "0"}
HEAP_ONLY = {"MLILT_MALLOC": "default", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def run_setting(args) -> dict:
    """Child: one epoch with this allocator setting; per-step rusage deltas."""
    sys.path.insert(0, args.tree)  # this checkout's mlilt, before the installed one
    if args.setting != "heap":
        os.environ["MLILT_MALLOC"] = "huge-pages"  # tune_allocator: huge pages; the threshold is set below
    from mlilt.speed.allocator import fix_mmap_threshold, tune_allocator
    tune_allocator()
    if args.setting != "heap":
        fix_mmap_threshold(parse_size(args.setting.split("/")[0]))
    import mlilt
    from mlilt.training import Callback, train

    class StepUsage(Callback):
        """Each step's user and system CPU seconds and minor page faults."""

        def __init__(self):
            self.deltas: list[tuple[float, float, int]] = []

        def on_step_start(self, info):
            self.before = resource.getrusage(resource.RUSAGE_SELF)

        def on_step_end(self, info):
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.deltas.append((after.ru_utime - self.before.ru_utime, after.ru_stime - self.before.ru_stime,
                                after.ru_minflt - self.before.ru_minflt))

    usage = StepUsage()
    train(one_epoch_config(args.pairs_file, args.work, args.method, args.anchor), callbacks=[usage])
    deltas = usage.deltas
    steady = deltas[2:] or deltas
    user, system, faults = (statistics.median(column) for column in zip(*steady))
    return {"mlilt": str(Path(mlilt.__file__).parent.parent), "user_s": user, "sys_s": system, "faults": faults,
            "peak_mb": peak_rss_mb(), "steps": len(deltas)}


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ln")
    parser.add_argument("--anchor", default="", help="train against this pack (image side frozen)")
    parser.add_argument("--settings", default="16M,4M,heap", help="allocator settings, see above")
    parser.add_argument("--trees", default=str(REPO), help="checkouts of mlilt to measure (comma-separated)")
    parser.add_argument("--pairs", type=int, default=500, help="demo scenes (80%% train: 12 steps at 500)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(run_setting(args))
        return
    work = scratch_dir("mlilt-kernel-")
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    cells = [(tree, setting) for tree in args.trees.split(",") for setting in args.settings.split(",")]
    results: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    for repeat in range(args.repeats):
        for tree, setting in turn_order(cells, repeat):
            child = ["--child", "--setting", setting, "--tree", tree, "--pairs-file", str(pairs_file),
                     "--work", str(work), "--method", args.method, "--anchor", args.anchor]
            env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": "1",
                   **(HEAP_ONLY if setting == "heap" else {}), **(SMALL_PAGES if setting.endswith("/4k") else {})}
            result = run_child(__file__, child, env=env)
            if Path(result["mlilt"]).resolve() != Path(tree).resolve():
                raise SystemExit(f"{tree}: the child imported mlilt from {result['mlilt']}")
            results[(tree, setting)].append(result)
            print(f"{tree} {setting}: user {result['user_s']:.3f} s, system {result['sys_s']:.3f} s, "
                  f"{result['faults']:.0f} faults per step, peak {result['peak_mb']:.0f} MB", flush=True)
    print(f"\nmachine: {machine()}\n{args.method}{' anchored on ' + args.anchor if args.anchor else ''}; "
          f"batch 32; 1 torch thread; median per step after the first two; median over {args.repeats} runs\n")
    rows = []
    for (tree, setting), runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in ("user_s", "sys_s", "faults", "peak_mb")}
        rows.append([tree, setting, f"{med['user_s']:.2f}", f"{med['sys_s']:.2f}",
                     f"{med['user_s'] + med['sys_s']:.2f}", f"{med['faults']:,.0f}", f"{med['peak_mb']:,.0f}"])
    print(table(["checkout", "allocator", "user s/step", "system s/step", "CPU s/step", "minor faults/step",
                 "peak MB"], rows))


if __name__ == "__main__":
    main()
