"""Serving one loaded model from several threads: same embeddings, bounded memory.

    python benchmarks/load/threads.py [--threads 8] [--rounds 20] [--pack langpacks/sw]

One ``mlilt.load(pack)`` (default: the committed Swahili pack on the offline towers) serves
``--threads`` threads at once; each encodes its own captions (``encode_text``) and images
(``encode_image`` on PIL images) ``--rounds`` times. Every result is compared with the same
call made from one thread beforehand, and the resident set is sampled every 50 ms. The image
side is built by the first thread that needs it, once. Prints a table row.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "perf")]  # mlilt from this checkout
from _common import machine, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402


def inputs(threads: int, per_thread: int):
    """Captions and images of different lengths and content for each thread."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "duara nyekundu mraba wa bluu juu kushoto nyota ndogo ya njano chini katikati".split()
    texts = [[" ".join(rng.choice(words, size=3 + (i * 7 + j) % 20)) for j in range(per_thread)]
             for i in range(threads)]
    images = [[Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(per_thread)]
              for _ in range(threads)]
    return texts, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", default=str(ROOT / "langpacks" / "sw"))
    parser.add_argument("--lang", default="sw")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-thread", type=int, default=16, help="captions and images per call")
    args = parser.parse_args()

    import torch

    import mlilt

    texts, images = inputs(args.threads, args.per_thread)
    reference = mlilt.load(args.pack)
    expected = [(reference.encode_text(t, lang=args.lang), reference.encode_image(i)) for t, i in zip(texts, images)]
    del reference

    model = mlilt.load(args.pack)  # fresh: the threads race to build its image side
    reset_peak_rss()
    before = rss_mb()
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append(rss_mb())

    def serve(index: int) -> float:
        worst = 0.0
        for _ in range(args.rounds):
            text = model.encode_text(texts[index], lang=args.lang)
            image = model.encode_image(images[index])
            for got, want in zip((text, image), expected[index]):
                worst = max(worst, float((got - want).abs().max()))
        return worst

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        worst = max(pool.map(serve, range(args.threads)))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    calls = args.threads * args.rounds * args.per_thread
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
    print("| threads | rounds | captions + images | seconds | items/s | largest difference from one thread "
          "| RSS before | peak RSS | max sampled RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.threads} | {args.rounds} | {calls} + {calls} | {seconds:.1f} | {2 * calls / seconds:.0f} "
          f"| {worst:.1e} | {before:,.0f} MB | {peak_rss_mb():,.0f} MB | {max(samples, default=before):,.0f} MB |")


if __name__ == "__main__":
    main()
