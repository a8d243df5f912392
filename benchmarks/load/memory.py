"""Load check: memory stays flat across training epochs and bounded for large evaluations.

    python benchmarks/load/memory.py epochs    [--pairs 50000] [--epochs 3]
    python benchmarks/load/memory.py scaling   [--sizes 5000,10000,20000,50000] [--epochs 3]
    python benchmarks/load/memory.py retrieval [--sizes 1000,10000,100000]
    python benchmarks/load/memory.py evaluate  [--captions 100000] [--captions-per-image 1]

Training uses tiny random towers from ``tests/tiny_towers.py`` (the check is about the loop's
memory and cost, not about learning) on generated demo pairs (32 px) with the image side
frozen, so image features come from the feature cache. It runs through the public
``mlilt.training.train`` with a training callback that closes a memory window when the
first step is next ("setup": data, model, image features, the first validation) and at each
epoch's end, so every epoch gets its own memory window.

Memory is the process's resident set from ``/proc/self/status``: the peak of a window is
``VmHWM`` after resetting it at the window's start (``/proc/self/clear_refs``, exact), and a
thread also samples ``VmRSS`` every 50 ms as a cross-check. Linux only. MB here are MiB.
CPU seconds of the process are given beside wall seconds: on a shared machine they are the
steadier figure (and pass ``--threads 1``: oversubscribed torch threads spin at barriers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks" / "perf")]  # mlilt from this checkout; the tiny towers
from _common import scratch_dir  # noqa: E402

MB = 1024  # /proc reports kB


def proc_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / MB


def reset_peak() -> None:
    """Restart ``VmHWM`` from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class MemoryWindows:
    """Peak and end RSS per named window; ``mark(name)`` closes the window in progress.

    Windows marked with the same name merge (peak of peaks, last end).
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.rows, self.sampled = interval, {}, 0.0
        self.started, self.cpu = time.perf_counter(), time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        reset_peak()
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, proc_mb("VmRSS"))

    def mark(self, name: str) -> None:
        now, cpu, peak, end = time.perf_counter(), time.process_time(), proc_mb("VmHWM"), proc_mb("VmRSS")
        sampled, self.sampled = max(self.sampled, end), end
        reset_peak()
        old = self.rows.get(name, {"peak": 0.0, "sampled": 0.0, "seconds": 0.0, "cpu": 0.0})
        self.rows[name] = {"peak": max(old["peak"], peak), "sampled": max(old["sampled"], sampled), "end": end,
                           "seconds": old["seconds"] + now - self.started, "cpu": old["cpu"] + cpu - self.cpu}
        self.started, self.cpu = now, cpu

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def epoch_windows(windows: MemoryWindows):
    """A training callback that closes the "setup" window before the first step and an
    "epoch N" window at the end of each epoch (after its validation)."""
    from mlilt.training import Callback

    class EpochWindows(Callback):
        def on_fit_start(self, state):
            windows.mark("setup")

        def on_epoch_end(self, row):
            windows.mark(f"epoch {row['epoch']}")

    return EpochWindows()


# --------------------------------------------------------------------------------------------
# Data and towers


def register_tiny_towers() -> None:
    from tiny_towers import tiny_text_tower, tiny_timm_cnn

    from mlilt.towers.registry import register_tower
    register_tower(tiny_text_tower())
    register_tower(tiny_timm_cnn())


def demo_pairs(root: Path, pairs: int) -> Path:
    """``pairs`` demo caption lines (Swahili, 32 px) under ``root``, generated once and reused."""
    from mlilt.demo.data import generate_demo

    data = root / "data"
    scenes = int(pairs / 0.8) + 1  # the generator keeps 20% of scenes for its test split
    marker = data / "scenes.n"
    if not marker.exists() or int(marker.read_text()) < scenes:
        started = time.perf_counter()
        generate_demo(data, ["sw"], n=scenes, image_size=32, overwrite=True)
        marker.write_text(str(scenes))
        print(f"generated {scenes:,} demo scenes in {time.perf_counter() - started:.0f} s", flush=True)
    return data / "sw" / "train.jsonl"


def subset(train_file: Path, lines: int) -> Path:
    """The first ``lines`` lines of ``train_file`` beside it (relative image paths still resolve)."""
    rows = train_file.read_text().splitlines(keepends=True)
    if len(rows) < lines:
        raise SystemExit(f"{train_file} has {len(rows)} pairs, fewer than {lines}")
    out = train_file.with_name(f"train_{lines}.jsonl")
    out.write_text("".join(rows[:lines]))
    return out


# --------------------------------------------------------------------------------------------
# Training


def train_tiny(data: Path, out: Path, epochs: int, holdout: int, callbacks=()):
    from mlilt.training import TrainConfig, train

    config = TrainConfig(lang="sw", data=str(data), out=str(out), text_tower="tiny-bert-0",
                         image_tower="tiny-timm-cnn", method="ln@text", epochs=epochs, batch_size=256,
                         holdout=holdout, overwrite=True)
    return train(config, callbacks=callbacks)


def epochs_table(root: Path, pairs: int, epochs: int, holdout: int) -> None:
    """Peak RSS within each epoch, and RSS at its end, training on ``pairs`` pairs."""
    data = subset(demo_pairs(root, pairs + holdout), pairs + holdout)
    windows = MemoryWindows()
    result = train_tiny(data, root / f"pack_{pairs}", epochs, holdout, callbacks=[epoch_windows(windows)])
    windows.mark("save")
    windows.close()
    seconds = {f"epoch {row['epoch']}": row["seconds"] for row in result.history if "seconds" in row}
    print(f"\n{pairs:,} training pairs, {holdout:,} held out, batch 256, {epochs} epochs")
    print("| window | wall s (all) | wall s (training steps) | CPU s | peak RSS (VmHWM) | max sampled RSS "
          "| RSS at end |")
    print("|---|---|---|---|---|---|---|")
    for name, row in windows.rows.items():
        steps = f"{seconds[name]:.1f}" if name in seconds else "-"
        print(f"| {name} | {row['seconds']:.1f} | {steps} | {row['cpu']:.1f} | {row['peak']:,.0f} MB | {row['sampled']:,.0f} MB "
              f"| {row['end']:,.0f} MB |")
    first, last = windows.rows["epoch 1"], windows.rows[f"epoch {epochs}"]
    print(f"epoch 1 -> epoch {epochs}: peak {last['peak'] - first['peak']:+.0f} MB, "
          f"end {last['end'] - first['end']:+.0f} MB", flush=True)


def scaling_table(root: Path, sizes: list[int], epochs: int, holdout: int) -> None:
    """Seconds per epoch against the number of pairs: wall seconds of the training steps (the
    loop's own figure) and CPU seconds of the process over the epoch (steps plus the fixed
    validation on ``holdout`` pairs), which other jobs on the machine disturb far less.
    """
    train_file = demo_pairs(root, max(sizes) + holdout)
    print("\n| pairs | wall s/epoch (each) | CPU s/epoch (each) | µs/pair, wall (fastest) | µs/pair, CPU (least) |")
    print("|---|---|---|---|---|")
    for pairs in sizes:
        windows = MemoryWindows()
        result = train_tiny(subset(train_file, pairs + holdout), root / f"pack_{pairs}", epochs, holdout,
                            callbacks=[epoch_windows(windows)])
        windows.close()
        wall = [row["seconds"] for row in result.history if "seconds" in row]  # epoch 0: validation only
        cpu = [windows.rows[f"epoch {e}"]["cpu"] for e in range(1, epochs + 1)]
        trained = (pairs // 256) * 256  # the loop runs full batches only
        print(f"| {pairs:,} | " + ", ".join(f"{s:.1f}" for s in wall) + " | " + ", ".join(f"{s:.1f}" for s in cpu)
              + f" | {1e6 * min(wall) / trained:.0f} | {1e6 * min(cpu) / trained:.0f} |", flush=True)


# --------------------------------------------------------------------------------------------
# Evaluation


def retrieval_function(path: str | None):
    """``retrieval_metrics`` of this checkout, or of another version's ``retrieval.py`` file."""
    if path is None:
        from mlilt.evaluation.retrieval import retrieval_metrics
        return retrieval_metrics
    import importlib.util
    spec = importlib.util.spec_from_file_location("retrieval_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.retrieval_metrics


def retrieval_table(sizes: list[int], path: str | None = None, dim: int = 256) -> None:
    """Time and peak extra RSS of ``retrieval_metrics`` on n captions x n images (one each)."""
    retrieval_metrics = retrieval_function(path)
    print("\n| captions x images | seconds | RSS before | peak RSS | peak extra |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        text = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        before = proc_mb("VmRSS")
        reset_peak()
        started = time.perf_counter()
        retrieval_metrics(text, image, torch.arange(n))
        seconds, peak = time.perf_counter() - started, proc_mb("VmHWM")
        print(f"| {n:,} x {n:,} | {seconds:.1f} | {before:,.0f} MB | {peak:,.0f} MB | {peak - before:+,.0f} MB |",
              flush=True)
        del text, image


def with_second_captions(train_file: Path, images: int) -> Path:
    """The first ``images`` pairs of ``train_file``, each followed by a second caption of its image.

    The second caption is the demo generator's caption of the same scene drawn with another
    seed (another frame or shape order; identical now and then, which counts as a duplicate).
    """
    from mlilt.demo.data import caption_scene

    scenes = {}
    for line in (train_file.parents[1] / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        scenes[scene["scene"]] = scene
    rows = []
    for line in train_file.read_text().splitlines()[:images]:
        row = json.loads(line)
        rows += [row, dict(row, caption=caption_scene(scenes[row["scene"]], "sw", seed=1))]
    out = train_file.with_name(f"eval_{images}x2.jsonl")
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return out


def evaluate_table(root: Path, captions: int, per_image: int) -> None:
    """``mlilt.evaluation.evaluate`` ("custom" pairs) of a tiny-tower pack on ``captions`` demo captions.

    The path ``mlilt eval --benchmark custom`` takes: pairs read, image features through the
    feature cache, captions encoded by the pack's text side, retrieval both ways.
    """
    from mlilt.evaluation.evaluate import evaluate

    images = captions // per_image
    train_file = demo_pairs(root, images)
    data = subset(train_file, images) if per_image == 1 else with_second_captions(train_file, images)
    pack = root / "pack_eval"
    train_tiny(subset(train_file, 2_000), pack, 1, 200)
    before = proc_mb("VmRSS")
    windows = MemoryWindows()
    started = time.perf_counter()
    [result] = evaluate("custom", [str(pack)], data=str(data), langs=["sw"])
    seconds = time.perf_counter() - started
    windows.mark("evaluate")
    windows.close()
    row = windows.rows["evaluate"]
    print("\n| captions x images | seconds | RSS before | peak RSS (VmHWM) | peak extra | max sampled RSS "
          "| RSS at end | mean recall |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {captions:,} x {images:,} | {seconds:.0f} | {before:,.0f} MB | {row['peak']:,.0f} MB "
          f"| {row['peak'] - before:+,.0f} MB | {row['sampled']:,.0f} MB | {row['end']:,.0f} MB "
          f"| {result.metrics['mean_recall']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["epochs", "scaling", "retrieval", "evaluate"])
    parser.add_argument("--pairs", type=int, default=50_000, help="epochs: training pairs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs: 3, scaling: 3")
    parser.add_argument("--holdout", type=int, default=1_000, help="validation pairs, on top of --pairs")
    parser.add_argument("--sizes", default=None, help="comma-separated; scaling: pairs, retrieval: n")
    parser.add_argument("--captions", type=int, default=100_000, help="evaluate: captions (one per image)")
    parser.add_argument("--retrieval-file", default=None,
                        help="retrieval: time this retrieval.py (e.g. an older version) instead of mlilt's")
    parser.add_argument("--captions-per-image", type=int, choices=[1, 2], default=1,
                        help="evaluate: 2 pairs each image with a second caption (half as many images)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", default=None, help="where generated data and packs go (default: temp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = scratch_dir("mlilt-load-", args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLILT_CACHE", str(root / "cache"))  # a fresh feature cache, not the user's
    register_tiny_towers()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if args.part == "epochs":
        epochs_table(root, args.pairs, args.epochs or 3, args.holdout)
    elif args.part == "scaling":
        scaling_table(root, sizes or [5_000, 10_000, 20_000, 50_000], args.epochs or 3, args.holdout)
    elif args.part == "retrieval":
        retrieval_table(sizes or [1_000, 10_000, 100_000], args.retrieval_file)
    else:
        evaluate_table(root, args.captions, args.captions_per_image)


if __name__ == "__main__":
    main()
