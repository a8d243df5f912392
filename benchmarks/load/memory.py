"""Load check: memory stays flat across training epochs and bounded for large evaluations.

    python benchmarks/load/memory.py [--pairs 50000] [--epochs 3] [--captions 100000]

Training uses tiny random towers (the check is about the loop's memory, not about learning)
on generated demo pairs with the image side frozen, so features come from the cache; it
prints peak RSS after every epoch. Evaluation scores `--captions` random caption embeddings
against as many images with CLIP_benchmark recall, in chunks, and prints time and peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training(pairs: int, epochs: int) -> None:
    from tiny_towers import tiny_text_tower, tiny_timm_cnn

    from mlilt.data.demo import generate_demo
    from mlilt.progress import TrainProgress
    from mlilt.towers.registry import register_tower
    from mlilt.train import train
    from mlilt.train_config import TrainConfig

    register_tower(tiny_text_tower())
    register_tower(tiny_timm_cnn())
    root = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    generate_demo(root / "data", ["sw"], n=int(pairs / 0.8) + 1, image_size=32)
    print(f"generated {pairs} pairs in {time.perf_counter() - started:.0f} s; peak RSS {peak_rss_mb():.0f} MB")

    def log_epoch(self, row):
        print(f"epoch {row['epoch']}: {row['samples_per_s']} pairs/s, peak RSS {peak_rss_mb():.0f} MB", flush=True)

    TrainProgress.log_epoch = log_epoch  # print with the RSS, with or without a console
    train(TrainConfig(lang="sw", data=str(root / "data/sw/train.jsonl"), out=str(root / "pack"),
                      text_tower="tiny-bert-0", image_tower="tiny-timm-cnn", method="ln@text", epochs=epochs,
                      batch_size=256, holdout=max(2, min(1000, pairs // 10))), console=None)


def evaluation(captions: int) -> None:
    from mlilt.evaluation.retrieval import retrieval_metrics

    before = peak_rss_mb()
    generator = torch.Generator().manual_seed(0)
    for n in (1_000, 10_000, captions):
        text = torch.nn.functional.normalize(torch.randn(n, 256, generator=generator), dim=-1)
        image = torch.nn.functional.normalize(torch.randn(n, 256, generator=generator), dim=-1)
        started = time.perf_counter()
        retrieval_metrics(text, image, list(range(n)), chunk=2048)
        print(f"retrieval {n:,} captions x {n:,} images: {time.perf_counter() - started:.1f} s, "
              f"peak RSS {peak_rss_mb():.0f} MB ({peak_rss_mb() - before:+.0f} MB over the start)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--captions", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    evaluation(args.captions)
    training(args.pairs, args.epochs)


if __name__ == "__main__":
    main()
