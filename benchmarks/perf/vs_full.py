"""Step time and peak memory of parameter-efficient methods vs full fine-tuning.

    python benchmarks/perf/vs_full.py [--methods ln,ln+adapter,lora] [--anchored-methods ln,ln+adapter,lora]
                                      [--pairs 500] [--warmup 2] [--repeat 1]

A method may carry training options after a slash: ``ln/ckpt`` (``--grad-checkpointing``),
``ln/norms`` (``--recompute-norms``), ``ln+adapter/bf16`` (``--bf16``), ``ln/ckpt/bf16``, and
``ln+adapter/groups:N`` (a caption length group priced at N token positions, ``mlilt.modeling.encode``;
``groups:off``: every batch runs as one, padded to its longest caption).

The target: ``ln``, ``ln+adapter`` and ``lora`` steps take at most 0.5x the
time of a ``full`` step and at most 0.4x its peak memory. Same towers (the offline pair),
same demo pairs, batch 32. Each method runs in its own process: one epoch of
``mlilt.training.train`` (checkpoints off), each optimizer step (forward, loss, backward, clip,
AdamW step; captions are tokenized once before the first; images are decoded and preprocessed
inside the step whenever the image tower trains, else their tower features come from the cache)
timed by a training callback. Methods run unanchored (as ``mlilt train --method M``) and,
with ``--anchor``, anchored on a pack (``--method M --anchor PACK``: image side frozen).

Time: wall and CPU seconds of each step (on a shared machine CPU time is the one to compare;
the target column uses it). With ``--repeat N`` every method runs N times, in alternating order,
and each figure is the median over the N runs; each method's CPU ratio to the ``full`` run of
the same repeat is printed too. Memory: the process's resident set once both towers are loaded is the baseline; the peak
(Linux VmHWM, reset at that point) is taken over building the method, the one-off feature
pass and the steps. "extra" is the peak minus the baseline: what training adds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, demo_data, emit, machine, median, peak_rss_mb, reset_peak_rss,  # noqa: E402
                     one_epoch_config, rss_mb, run_child, scratch_dir, steady, table, turn_order)

from mlilt.training.callbacks import Callback  # noqa: E402

DEFAULT_METHODS = "ln,ln+adapter,lora"
FLAGS = {"bf16": "bf16", "ckpt": "grad_checkpointing", "norms": "recompute_norms"}  # METHOD/FLAG: training options


def run_method(args) -> dict:
    """Child: one epoch of ``mlilt.training.train`` with this method; each step timed, memory taken."""
    from mlilt.training import train
    from mlilt.towers.registry import load_image_tower, load_text_tower

    method, *flags = args.method.split("/")
    flags = [flag for flag in flags if not set_group_call_tokens(flag)]
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise SystemExit(f"{args.method}: unknown option {', '.join(sorted(unknown))}; known: {', '.join(FLAGS)}, "
                         f"groups:N, groups:off")
    config = one_epoch_config(args.pairs_file, args.work, method, args.anchor, batch_size=args.batch_size,
                              **{FLAGS[flag]: True for flag in flags})
    load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                    prefix=config.text_prefix)
    load_image_tower(config.image_tower)  # train() reuses both: they are the baseline
    baseline = rss_mb()
    reset = reset_peak_rss()
    clock = StepClock()
    started = time.perf_counter()
    train(config, callbacks=[clock])
    seconds = time.perf_counter() - started
    return {"method": args.method, "anchored": bool(args.anchor), "step_s": clock.times, "baseline_mb": baseline,
            "peak_mb": peak_rss_mb() if reset else float("nan"), "cached": clock.cached,
            "one_off_s": clock.one_off, "tokens": clock.tokens, "trainable": clock.trainable, "seconds": seconds,
            "cpu_s": clock.cpu_s}


def set_group_call_tokens(flag: str) -> bool:
    """``groups:N`` prices a caption length group at N token positions (``mlilt.modeling.encode``);
    ``groups:off`` runs every batch as one. Returns whether ``flag`` was such an option."""
    if not flag.startswith("groups:"):
        return False
    from mlilt.modeling import encode
    value = flag.split(":", 1)[1]
    encode.GROUP_CALL_TOKENS = 10**9 if value == "off" else int(value)
    return True


class StepClock(Callback):
    """Each step's wall and CPU seconds and caption token positions; the one-off image-feature pass."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_s: list[float] = []
        self.tokens: list[tuple[int, int, int]] = []
        self.cached, self.one_off, self.trainable = None, 0.0, 0

    def on_image_features(self, images, seconds):
        self.cached, self.one_off = images.cached, seconds

    def on_step_start(self, info):
        self.tokens.append(token_positions(info.texts.tokenized("train", info.split).lengths(info.batch)))
        self.trainable = sum(p.numel() for p in info.params)
        self.cpu = time.process_time()

    def on_step_end(self, info):
        self.times.append(info.seconds)
        self.cpu_s.append(time.process_time() - self.cpu)


def token_positions(lengths: list[int]) -> tuple[int, int, int]:
    """Caption token positions a step would run in length groups, in one padded batch, and its real tokens."""
    from mlilt.modeling.encode import length_groups

    grouped = sum(len(group) * max(lengths[i] for i in group) for group in length_groups(lengths))
    return grouped, len(lengths) * max(lengths), sum(lengths)


def measure(script: str, work: Path, pairs_file: Path, args) -> list[dict]:
    """Each method once per ``--repeat``, the order reversed every other time so that a slow
    minute does not fall on one method only; per method the medians over the repeats."""
    plan = [("full", "")] + [(m, "") for m in args.methods.split(",") if m]
    if args.anchor:
        plan += [(m, args.anchor) for m in args.anchored_methods.split(",") if m]
    runs: dict[tuple, list[dict]] = {cell: [] for cell in plan}
    for repeat in range(args.repeat):
        for method, anchor in turn_order(plan, repeat):
            runs[(method, anchor)].append(run_once(script, work, pairs_file, method, anchor, args))
    results = [combined(runs[cell]) for cell in plan]
    if args.repeat > 1:
        full_cpu = [r["steady_cpu_s"] for r in runs[plan[0]]]
        for (method, anchor), cell_runs in list(runs.items())[1:]:
            ratios = ", ".join(f"{r['steady_cpu_s'] / f:.2f}×" for r, f in zip(cell_runs, full_cpu))
            print(f"{method}{' (anchored)' if anchor else ''}: CPU vs full, repeat by repeat: {ratios}")
    return results


def run_once(script: str, work: Path, pairs_file: Path, method: str, anchor: str, args) -> dict:
    child = ["--child", "--work", str(work), "--pairs-file", str(pairs_file), "--method", method,
             "--batch-size", str(args.batch_size), "--anchor", anchor]
    env = {"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": str(args.threads)}
    result = run_child(script, child, env=env)
    result["steady_step_s"] = median(steady(result["step_s"], args.warmup))
    result["steady_cpu_s"] = median(steady(result["cpu_s"], args.warmup))
    result["extra_mb"] = result["peak_mb"] - result["baseline_mb"]
    print(f"{method}{' (anchored)' if anchor else ''}: median {result['steady_step_s']:.3f} s/step "
          f"({result['steady_cpu_s']:.3f} s CPU), "
          f"peak {result['peak_mb']:.0f} MB (+{result['extra_mb']:.0f} MB over the towers)", flush=True)
    return result


def combined(cell_runs: list[dict]) -> dict:
    """One method's repeats as one result: the median of each figure, every step's tokens."""
    result = dict(cell_runs[0])
    for key in ("steady_step_s", "steady_cpu_s", "peak_mb", "baseline_mb", "extra_mb"):
        result[key] = median([r[key] for r in cell_runs])
    result["tokens"] = [t for r in cell_runs for t in r["tokens"]]
    return result


def report(results: list[dict], args) -> str:
    full = results[0]
    rows = []
    for r in results:
        time_ratio = r["steady_cpu_s"] / full["steady_cpu_s"]  # CPU time: robust to other load
        peak_ratio, extra_ratio = r["peak_mb"] / full["peak_mb"], r["extra_mb"] / full["extra_mb"]
        verdict = "" if r is full else ("met" if time_ratio <= 0.5 and peak_ratio <= 0.4 else
                                        f"missed ({'time' if time_ratio > 0.5 else ''}"
                                        f"{' + ' if time_ratio > 0.5 and peak_ratio > 0.4 else ''}"
                                        f"{'memory' if peak_ratio > 0.4 else ''})")
        rows.append([r["method"] + (" (anchored)" if r["anchored"] else ""), "cached" if r["cached"] else "run per step",
                     f"{r['trainable']:,}", f"{r['steady_step_s']:.2f}", f"{r['steady_cpu_s']:.2f}",
                     f"{r['steady_step_s'] / full['steady_step_s']:.2f}×", f"{time_ratio:.2f}×",
                     f"{r['peak_mb']:,.0f}", f"{peak_ratio:.2f}×", f"{r['extra_mb']:,.0f}", f"{extra_ratio:.2f}×",
                     verdict])
    header = ["method", "image tower", "trained params", "wall s/step", "CPU s/step", "wall vs full",
              "CPU vs full", "peak MB", "peak vs full", "extra MB over towers", "extra vs full",
              "target (≤0.5× CPU time, ≤0.4× peak)"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="compared against full")
    parser.add_argument("--anchor", default=str(REPO / "langpacks" / "sw"),
                        help="also run --anchored-methods anchored on this pack ('' to skip)")
    parser.add_argument("--anchored-methods", default=DEFAULT_METHODS)
    parser.add_argument("--pairs", type=int, default=500,
                        help="demo scenes generated; 80%% train, one epoch of full batches (500: 12 steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each method, in alternating order; the table shows their medians")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(run_method(args))
        return
    work = scratch_dir("mlilt-perf-", args.work)
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    results = measure(__file__, work, pairs_file, args)
    grouped, padded, real = zip(*[t for r in results for t in r["tokens"]])
    print(f"\nmachine: {machine()}")
    print(f"{args.threads} torch thread(s) per run; batch {args.batch_size}; caption token positions per batch, "
          f"median: {median(real):.0f} real tokens (what a padding-free tower's linear layers see), "
          f"{median(grouped):.0f} in length groups (what its attention sees; every layer of other towers), "
          f"{median(padded):.0f} as one batch padded to its longest; median over steps after the first {args.warmup}\n")
    print(report(results, args))


if __name__ == "__main__":
    main()
