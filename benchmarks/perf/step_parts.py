"""Where a training step's CPU time goes: the forward passes, the backward pass and the rest;
and what the step costs with a part of the text tower left out (a timing only: the math is
then wrong, and no pack of such a run means anything).

    python benchmarks/perf/step_parts.py [--method ln+adapter] [--anchor PACK]
                                         [--leave-out attention,gelu] [--pairs 400] [--repeats 2]

Each variant runs in its own process: one epoch of ``mlilt.training.trainer.train`` on the demo pairs,
batch 32, one torch thread. Per training step it takes the CPU seconds (``process_time``) of
the whole step, of the forward passes (``TextSource.embed``, ``ImageSource.embed``) and of the
backward pass (``torch.autograd.backward``); "rest" is the loss, gradient clipping and the
optimizer. Medians after the first two steps, then the median over ``--repeats`` runs, which
alternate their order so a noisy minute does not fall on one variant only.

Parts that can be left out:

- ``attention``: every attention call of the padding-free text tower returns its queries.
  The query, key and value projections still run forward; the keys' and values' then get no
  gradient, so their two backward products per layer go too (on the offline tower about a
  tenth of a layer's matrix products). The tower's once-per-tower check against the model's
  own forward is skipped, as the two no longer agree.
- ``gelu``: every GELU (the feed-forward blocks' and the adapters') passes its input through.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, demo_data, emit, machine, one_epoch_config, run_child, scratch_dir, table,  # noqa: E402
                     turn_order)

PARTS = ("attention", "gelu")


def leave_out(part: str) -> None:
    """Replace ``part`` of the text tower for this process (before any tower is built)."""
    import torch.nn.functional as F

    if part == "attention":
        import mlilt.speed.packed as packed
        from mlilt.towers.text import HFTextTower

        packed._attend = lambda packing, projected, heads, size: projected[0] * 1.0
        HFTextTower._packing_agrees = lambda self, *inputs: True
    elif part == "gelu":
        F.gelu = lambda input, approximate="none": input
    else:
        raise SystemExit(f"--leave-out: unknown part {part!r}; known: {', '.join(PARTS)}")


def run_variant(args) -> dict:
    """Child: one epoch with ``args.variant`` left out ("none": the whole step)."""
    import torch

    import mlilt.training.trainer as training

    if args.variant != "none":
        leave_out(args.variant)
    times: dict[str, list[float]] = {"step": [], "forward": [], "backward": []}
    in_step = [False]

    def timed(function, key):
        def run(*a, **kw):
            if not in_step[0]:
                return function(*a, **kw)
            started = time.process_time()
            try:
                return function(*a, **kw)
            finally:
                times[key][-1] += time.process_time() - started
        return run

    step = training._step

    def measured_step(*a, **kw):
        in_step[0] = True
        times["forward"].append(0.0)
        times["backward"].append(0.0)
        started = time.process_time()
        try:
            return step(*a, **kw)
        finally:
            times["step"].append(time.process_time() - started)
            in_step[0] = False

    training._step = measured_step
    for source in (training.TextSource, training.ImageSource):
        source.embed = timed(source.embed, "forward")
    torch.autograd.backward = timed(torch.autograd.backward, "backward")
    config = one_epoch_config(args.pairs_file, args.work, args.method, args.anchor)
    training.train(config)
    return {key: statistics.median(values[2:] or values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ln+adapter")
    parser.add_argument("--anchor", default=str(REPO / "langpacks" / "sw"), help="train against this pack ('' for none)")
    parser.add_argument("--leave-out", default=",".join(PARTS), help=f"parts to time without: {', '.join(PARTS)}")
    parser.add_argument("--pairs", type=int, default=400, help="demo scenes (80%% train: 10 steps at 400)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(run_variant(args))
        return
    variants = ["none", *[part for part in args.leave_out.split(",") if part]]
    unknown = [part for part in variants[1:] if part not in PARTS]
    if unknown:
        raise SystemExit(f"--leave-out: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    work = scratch_dir("mlilt-step-parts-")
    pairs_file = demo_data(work / "demo", ["sw"], args.pairs) / "sw" / "train.jsonl"
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in turn_order(variants, repeat):
            child = ["--child", "--variant", variant, "--pairs-file", str(pairs_file), "--work", str(work),
                     "--method", args.method, "--anchor", args.anchor]
            result = run_child(__file__, child, env={"MLILT_CACHE": str(work / "mlilt_cache"), "OMP_NUM_THREADS": "1"})
            results[variant].append(result)
            print(f"{variant}: step {result['step']:.3f} s, forward {result['forward']:.3f} s, "
                  f"backward {result['backward']:.3f} s", flush=True)
    print(f"\nmachine: {machine()}\n{args.method}{' anchored on ' + args.anchor if args.anchor else ''}; batch 32; "
          f"1 torch thread; CPU s per step, median after the first two; median over {args.repeats} runs\n")
    print(table(["left out", "step", "forward", "backward", "rest", "step without it, vs whole"], rows(results)))


def rows(results: dict[str, list[dict]]) -> list[list[str]]:
    medians = {variant: {key: statistics.median(run[key] for run in runs) for key in ("step", "forward", "backward")}
               for variant, runs in results.items()}
    whole = medians["none"]["step"]
    return [[variant, f"{m['step']:.3f}", f"{m['forward']:.3f}", f"{m['backward']:.3f}",
             f"{m['step'] - m['forward'] - m['backward']:.3f}",
             "—" if variant == "none" else f"{m['step'] - whole:+.3f} s ({m['step'] / whole:.2f}×)"]
            for variant, m in medians.items()]


if __name__ == "__main__":
    main()
