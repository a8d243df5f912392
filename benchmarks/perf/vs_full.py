"""Step time and peak memory of parameter-efficient methods vs full fine-tuning.

    python benchmarks/perf/vs_full.py [--methods ln,ln+adapter,lora] [--steps 12] [--warmup 2]

Issue 6, target 2: ``ln``, ``ln+adapter`` and ``lora`` steps should take at most 0.5x the
time of a ``full`` step and at most 0.4x its peak memory. Same towers (the offline pair),
same demo pairs, batch 32. Each method runs in its own process through mlilt's own training
step (``mlilt.train._step``: tokenize, forward, loss, backward, clip, AdamW step; images are
decoded and preprocessed inside the step whenever the image tower trains, else their tower
features come from the cache). Methods run unanchored (as ``mlilt train --method M``) and,
with ``--anchor``, anchored on a pack (``--method M --anchor PACK``: image side frozen).

Memory: the process's resident set once both towers are loaded is the baseline; the peak
(Linux VmHWM, reset at that point) is taken over building the method, the one-off feature
pass and the steps. "extra" is the peak minus the baseline: what training adds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, demo_data, emit, machine, median, peak_rss_mb, reset_peak_rss,  # noqa: E402
                     rss_mb, run_child, steady, table)

DEFAULT_METHODS = "ln,ln+adapter,lora"


def run_method(args) -> dict:
    """Child: one method, ``--steps`` optimizer steps, step times and memory."""
    import torch

    import mlilt.train as training
    from mlilt.progress import TrainProgress
    from mlilt.towers.registry import load_image_tower, load_text_tower
    from mlilt.train_config import TrainConfig

    config = TrainConfig(lang="sw", data=args.pairs_file, out=str(Path(args.work) / "unused"), method=args.method,
                         anchor=args.anchor or None, batch_size=args.batch_size, holdout=2)
    load_text_tower(config.text_tower, max_length=config.max_length), load_image_tower(config.image_tower)
    baseline = rss_mb()
    reset = reset_peak_rss()
    split, val_split, _ = training._load_data(config)
    model, report, _ = training._build_model(config)
    images = training.ImageSource(model.image, config)
    started = time.perf_counter()
    images.prepare(split, val_split, TrainProgress(None))
    one_off = time.perf_counter() - started
    optimizer = training._optimizer(model, config)
    params = model.trainable_parameters()
    order = torch.randperm(len(split.captions), generator=torch.Generator().manual_seed(0)).tolist()
    batches = training._batches(order, config.batch_size)
    times, tokens = [], []
    for batch in (batches * (args.steps // len(batches) + 1))[:args.steps]:
        tokens.append(model.text.tower.tokenize([split.captions[i] for i in batch])["input_ids"].shape[1])
        started = time.perf_counter()
        loss, fault = training._step(model, split, images, batch, params, optimizer, config)
        times.append(time.perf_counter() - started)
        if fault:
            raise RuntimeError(fault)
    return {"method": args.method, "anchored": bool(args.anchor), "step_s": times, "baseline_mb": baseline,
            "peak_mb": peak_rss_mb() if reset else float("nan"), "cached": images.cached, "one_off_s": one_off,
            "tokens": tokens, "trainable": sum(p.numel() for p in params)}


def measure(script: str, work: Path, pairs_file: Path, args) -> list[dict]:
    plan = [("full", "")] + [(m, "") for m in args.methods.split(",")]
    if args.anchor:
        plan += [(m, args.anchor) for m in args.methods.split(",")]
    results = []
    for method, anchor in plan:
        child = ["--child", "--work", str(work), "--pairs-file", str(pairs_file), "--method", method,
                 "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--anchor", anchor]
        result = run_child(script, child, env={"MLILT_CACHE": str(work / "mlilt_cache")})
        result["steady_step_s"] = median(steady(result["step_s"], args.warmup))
        result["extra_mb"] = result["peak_mb"] - result["baseline_mb"]
        results.append(result)
        print(f"{method}{' (anchored)' if anchor else ''}: median {result['steady_step_s']:.3f} s/step, "
              f"peak {result['peak_mb']:.0f} MB (+{result['extra_mb']:.0f} MB over the towers)", flush=True)
    return results


def report(results: list[dict], args) -> str:
    full = results[0]
    rows = []
    for r in results:
        time_ratio = r["steady_step_s"] / full["steady_step_s"]
        peak_ratio, extra_ratio = r["peak_mb"] / full["peak_mb"], r["extra_mb"] / full["extra_mb"]
        verdict = "" if r is full else ("met" if time_ratio <= 0.5 and peak_ratio <= 0.4 else
                                        f"missed ({'time' if time_ratio > 0.5 else ''}"
                                        f"{' + ' if time_ratio > 0.5 and peak_ratio > 0.4 else ''}"
                                        f"{'memory' if peak_ratio > 0.4 else ''})")
        rows.append([r["method"] + (" (anchored)" if r["anchored"] else ""), "cached" if r["cached"] else "run per step",
                     f"{r['trainable']:,}", f"{r['steady_step_s']:.3f}", f"{time_ratio:.2f}×",
                     f"{r['peak_mb']:,.0f}", f"{peak_ratio:.2f}×", f"{r['extra_mb']:,.0f}", f"{extra_ratio:.2f}×",
                     verdict])
    header = ["method", "image tower", "trained params", "step s (median)", "time vs full", "peak MB",
              "peak vs full", "extra MB over towers", "extra vs full", "target (≤0.5× time, ≤0.4× peak)"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="compared against full")
    parser.add_argument("--anchor", default=str(REPO / "langpacks" / "sw"),
                        help="also run the methods anchored on this pack ('' to skip)")
    parser.add_argument("--pairs", type=int, default=500, help="demo scenes generated (80%% train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(run_method(args))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="mlilt-perf-"))
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    results = measure(__file__, work, pairs_file, args)
    tokens = [t for r in results for t in r["tokens"]]
    print(f"\nmachine: {machine()}")
    print(f"batch {args.batch_size}, caption tokens per batch (padded to the longest): "
          f"median {median(tokens):.0f}, max {max(tokens)}; median over steps after the first {args.warmup}\n")
    print(report(results, args))


if __name__ == "__main__":
    main()
