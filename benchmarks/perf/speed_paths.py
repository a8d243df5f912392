"""Each CPU speed path side by side with the plain PyTorch path, on the default workloads.

    python benchmarks/perf/speed_paths.py [--repeat 3] [--pairs 800] [--threads 2]

Workloads, each at ``mlilt train``'s defaults (``ln+adapter``, batch 64, the offline pair):

* ``anchored``: against ``langpacks/sw`` (image side frozen, its features from the cache);
* ``anchored-bf16``: the same with ``--bf16``;
* ``both-towers``: no anchor, so the image tower trains and runs forward and backward each step.

Per workload the variants are: ``default`` (every speed path), ``none`` (``--speed-paths
none``: plain PyTorch), and the default with one path left out (``-padding-free``, ...), only
for the paths that act on that workload. Each variant runs in its own process: one epoch of
``mlilt.training.train``, each optimizer step timed by a callback (wall and CPU seconds), the
first ``--warmup`` steps left out; every variant runs ``--repeat`` times in alternating order
and the table shows medians. "gain" is how much longer the step takes without the path
(without: with − 1), the figure the ≥ 10% rule reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, demo_data, emit, machine, median, one_epoch_config, peak_rss_mb,  # noqa: E402
                     reset_peak_rss, run_child, scratch_dir, steady, table, turn_order)
from vs_full import StepClock  # noqa: E402

WORKLOADS = {  # name -> (anchored, bf16, the speed paths that act on it)
    "anchored": (True, False, ("padding-free",)),
    "anchored-bf16": (True, True, ("padding-free", "math-attention")),
    "both-towers": (False, False, ("padding-free", "channels-last", "lean-backward")),
}


def variants(paths: tuple[str, ...]) -> list[str]:
    return ["default", "none"] + [f"-{path}" for path in paths]


def run_variant(args) -> dict:
    """Child: one epoch with this workload's variant; each step timed, the peak taken."""
    from mlilt.speed import SPEED_PATHS

    anchored, bf16, _ = WORKLOADS[args.workload]
    off = set(SPEED_PATHS) if args.variant == "none" else {args.variant.lstrip("-")} - {"default"}
    from mlilt.training import train

    paths = ",".join(sorted(set(SPEED_PATHS) - off)) or "none"
    anchor = str(REPO / "langpacks" / "sw") if anchored else ""
    config = one_epoch_config(args.pairs_file, args.work, "ln+adapter", anchor, batch_size=64, bf16=bf16,
                              speed_paths=paths)
    reset_peak_rss()
    clock = StepClock()
    train(config, callbacks=[clock])
    return {"step_s": clock.times, "cpu_s": clock.cpu_s, "peak_mb": peak_rss_mb()}


def measure(work: Path, pairs_file: Path, args) -> dict:
    chosen = set(args.variants.split(",")) | {"default"} if args.variants else None
    plan = [(w, v) for w in args.workloads.split(",") for v in variants(WORKLOADS[w][2])
            if chosen is None or v in chosen]
    runs: dict[tuple, list[dict]] = {cell: [] for cell in plan}
    for repeat in range(args.repeat):
        for workload, variant in turn_order(plan, repeat):
            child = ["--child", "--work", str(work), "--pairs-file", str(pairs_file),
                     "--workload", workload, f"--variant={variant}"]
            env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": str(args.threads)}
            result = run_child(__file__, child, env=env)
            result["wall"] = median(steady(result["step_s"], args.warmup))
            result["cpu"] = median(steady(result["cpu_s"], args.warmup))
            print(f"{workload} {variant}: {result['wall']:.3f} s/step wall, {result['cpu']:.3f} CPU, "
                  f"peak {result['peak_mb']:,.0f} MB", flush=True)
            runs[(workload, variant)].append(result)
    return runs


def report(runs: dict) -> str:
    rows = []
    for (workload, variant), cell in runs.items():
        wall, cpu = median([r["wall"] for r in cell]), median([r["cpu"] for r in cell])
        peak = median([r["peak_mb"] for r in cell])
        base = runs[(workload, "default")]
        base_wall, base_cpu = median([r["wall"] for r in base]), median([r["cpu"] for r in base])
        gain = "" if variant == "default" else f"{wall / base_wall - 1:+.0%} wall, {cpu / base_cpu - 1:+.0%} CPU"
        each = ", ".join(f"{r['wall']:.2f}" for r in cell)
        rows.append([workload, variant, f"{wall:.2f} ({each})", f"{cpu:.2f}", f"{peak:,.0f}", gain])
    return table(["workload", "variant", "wall s/step (each run)", "CPU s/step", "peak MB",
                  "without it vs default"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", default="", help="only these variants (comma list; default: all)")
    parser.add_argument("--pairs", type=int, default=800, help="demo scenes; 80%% train (800: 10 steps of 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default: the whole machine)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(run_variant(args))
        return
    work = scratch_dir("mlilt-speed-", args.work)
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    runs = measure(work, pairs_file, args)
    print(f"\nmachine: {machine()}\n{args.threads} torch thread(s) per run; ln+adapter, batch 64; "
          f"medians over {args.repeat} run(s), steps after the first {args.warmup}\n")
    print(report(runs))


if __name__ == "__main__":
    main()
