"""Where a training step's CPU time goes: the forward passes, the backward pass and the rest;
and what the step costs with a part of the text tower left out (a timing only: the math is
then wrong, and no pack of such a run means anything).

    python benchmarks/perf/step_parts.py [--method ln+adapter] [--anchor PACK]
                                         [--leave-out attention,gelu] [--pairs 400] [--repeats 2]

Each variant runs in its own process: one epoch of ``mlilt.training.train`` on the demo pairs,
batch 32, one torch thread. Per training step a training callback takes the CPU seconds
(``process_time``) of the whole step, of the forward passes (from the ``text`` phase to the
``loss`` phase: captions and images embedded and gathered) and of the backward pass (the
``backward`` phase); "rest" is the loss, gradient clipping and the optimizer. Medians after the first two steps, then the median over ``--repeats`` runs, which
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

from mlilt.training.callbacks import Callback  # noqa: E402

PARTS = ("attention", "gelu")


def leave_out(part: str) -> None:
    """Replace ``part`` of the text tower for this process (before any tower is built)."""
    import torch.nn.functional as F

    if part == "attention":
        import mlilt.speed.packed as packed
        from mlilt.towers.hf_text import HFTextTower

        packed._attend = lambda packing, projected, heads, size: projected[0] * 1.0
        HFTextTower._packing_agrees = lambda self, *inputs: True
    elif part == "gelu":
        F.gelu = lambda input, approximate="none": input
    else:
        raise SystemExit(f"--leave-out: unknown part {part!r}; known: {', '.join(PARTS)}")


class PhaseTimes(Callback):
    """CPU seconds of each step, of its forward passes and of its backward pass."""

    def __init__(self):
        self.times: dict[str, list[float]] = {"step": [], "forward": [], "backward": []}

    def on_step_start(self, info):
        self.times["forward"].append(0.0)
        self.times["backward"].append(0.0)
        self.started = self.phase_started = time.process_time()

    def on_step_phase(self, info, phase):
        now = time.process_time()
        if phase == "loss":  # the "text" and "image" phases are over
            self.times["forward"][-1] = now - self.phase_started
        elif phase == "update":  # the "backward" phase is over
            self.times["backward"][-1] = now - self.phase_started
        if phase in ("text", "backward"):
            self.phase_started = now

    def on_step_end(self, info):
        self.times["step"].append(time.process_time() - self.started)


def run_variant(args) -> dict:
    """Child: one epoch with ``args.variant`` left out ("none": the whole step)."""
    from mlilt.training import train

    if args.variant != "none":
        leave_out(args.variant)
    timer = PhaseTimes()
    train(one_epoch_config(args.pairs_file, args.work, args.method, args.anchor), callbacks=[timer])
    return {key: statistics.median(values[2:] or values) for key, values in timer.times.items()}


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
