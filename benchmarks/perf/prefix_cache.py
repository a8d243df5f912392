"""Text prefix cache: step time with and without it, on the real offline towers, in one run.

    python benchmarks/perf/prefix_cache.py [--pairs 400] [--batch-size 32] [--epochs 3] \
        [--method unlock:2@text] [--repeats 1]

``unlock:2@text`` trains the top 2 of me5-small's 12 blocks (and the projections); the image
tower (effnet-lite0) is frozen, so image features come from the feature cache in both runs.
With the prefix cache the first epoch runs the whole text tower once per caption (the lower
10 blocks without gradient) and later epochs run only the top 2 blocks. Each setting trains
the same demo pairs with the same seed (``--no-cache-text`` is the baseline); settings
alternate ``--repeats`` times so machine load drifts hit both. A step's time is the wall
time the trainer hands its step callbacks (``StepInfo.seconds``: embedding, loss, backward,
optimizer); the table gives the median over epoch 1 and over epochs 2+, and the memory the
cache reported.
"""
from __future__ import annotations

import argparse
import io
import platform
import re
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console

from mlilt.demo.data import generate_demo
from mlilt.training import Callback, TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import scratch_dir  # noqa: E402


def timed_run(config: TrainConfig) -> dict:
    """Train once; per-step seconds, the final loss and the cache's log line."""
    seconds: list[float] = []

    class StepSeconds(Callback):
        def on_step_end(self, info):
            seconds.append(info.seconds)

    log = Console(file=io.StringIO(), width=300)
    result = train(config, console=log, callbacks=[StepSeconds()])
    per_epoch = len(seconds) // config.epochs
    cache_line = re.search(r"text prefix cache: .*", log.file.getvalue())
    return {"epoch1": statistics.median(seconds[:per_epoch]), "later": statistics.median(seconds[per_epoch:]),
            "steps": len(seconds), "loss": result.history[-1]["loss"],
            "cache": cache_line.group(0) if cache_line else "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--method", default="unlock:2@text")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    work = scratch_dir("mlilt-prefix-cache-")
    generate_demo(work / "data", ["sw"], n=args.pairs, seed=0)
    rows = {False: [], True: []}
    for repeat in range(args.repeats):
        for cache in (False, True):
            config = TrainConfig(lang="sw", data=str(work / "data" / "sw" / "train.jsonl"),
                                 out=str(work / f"pack-{repeat}-{cache}"), method=args.method, epochs=args.epochs,
                                 batch_size=args.batch_size, checkpoint_every=10**6, cache_text=cache)
            rows[cache].append(timed_run(config))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {args.method}, {args.pairs} pairs, batch {args.batch_size}, "
          f"{args.epochs} epochs, {rows[False][0]['steps']} steps a run, {args.repeats} repeat(s)")
    print()
    print("| text prefix cache | epoch 1 step (s, median) | epochs 2+ step (s, median) | samples/s (2+) | final loss |")
    print("|---|---|---|---|---|")
    later = {}
    for cache in (False, True):
        epoch1 = statistics.median(r["epoch1"] for r in rows[cache])
        later[cache] = statistics.median(r["later"] for r in rows[cache])
        print(f"| {'on' if cache else 'off (--no-cache-text)'} | {epoch1:.3f} | {later[cache]:.3f} | "
              f"{args.batch_size / later[cache]:.1f} | {rows[cache][0]['loss']:.4f} |")
    print()
    print(f"epochs 2+: {later[False] / later[True]:.2f}x faster per step with the cache")
    print(rows[True][0]["cache"])


if __name__ == "__main__":
    main()
