"""Time to the first caption: a fresh process runs ``mlilt.load(pack)`` and ``encode_text``.

    python benchmarks/load/first_encode.py [--runs 5] [--workdir DIR]

The pack is the default method on the embedded offline towers (me5-small, effnet-lite0),
saved untrained: load time does not depend on what the tensors hold. One warm-up process
runs first (the offline towers are expanded once into the cache; the OS caches the files),
then each run is a new process, so "warm" means warm files, cold Python. Each run times
``import mlilt``; ``mlilt.load`` + the first ``encode_text`` (text-only use: the image side is
never built); and, in the same process, building the image side afterwards (what an eager
load would add). The table gives medians over the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "perf")]  # mlilt from this checkout
from _common import machine, median, scratch_dir  # noqa: E402

CHILD = """
import json, sys, time
started = time.perf_counter()
import mlilt
imported = time.perf_counter()
model = mlilt.load(sys.argv[1])
loaded = time.perf_counter()
model.encode_text(["mbwa anakimbia barabarani"], lang="sw")
encoded = time.perf_counter()
model.image
image = time.perf_counter()
print("RESULT " + json.dumps({"import": imported - started, "load": loaded - imported,
                              "first_encode": encoded - imported, "image_side": image - encoded}))
"""


def make_pack(folder: Path) -> Path:
    """An untrained pack of the default method on the default towers."""
    from mlilt.defaults import DEFAULT_EMBED_DIM, DEFAULT_IMAGE_TOWER, DEFAULT_METHOD, DEFAULT_TEXT_TOWER
    from mlilt.modeling.factory import build_sides
    from mlilt.modeling.model import ContrastiveModel
    from mlilt.packs import PackConfig, save_pack
    from mlilt.towers.registry import load_image_tower, load_text_tower

    pack = folder / "sw"
    if not pack.exists():
        towers = {"text": load_text_tower(DEFAULT_TEXT_TOWER), "image": load_image_tower(DEFAULT_IMAGE_TOWER)}
        sides, _ = build_sides(towers, DEFAULT_METHOD, DEFAULT_EMBED_DIM)
        model = ContrastiveModel(sides["text"], sides["image"])
        save_pack(pack, model, PackConfig.for_model(model, "sw", DEFAULT_METHOD))
    return pack


def run_child(pack: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(pack)], env=env, capture_output=True, text=True,
                          check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", help="keep the pack here (default: a temporary folder)")
    args = parser.parse_args()
    pack = make_pack(scratch_dir("mlilt-first-encode-", args.workdir))
    run_child(pack)  # warm-up
    runs = [run_child(pack) for _ in range(args.runs)]
    print(f"machine: {machine()}; {args.runs} fresh processes after one warm-up; medians in seconds\n")
    print("| import mlilt | mlilt.load + first encode_text | of which mlilt.load | image side, built later |")
    print("|---|---|---|---|")
    print("| " + " | ".join(f"{median([r[key] for r in runs]):.2f}"
                            for key in ("import", "first_encode", "load", "image_side")) + " |")


if __name__ == "__main__":
    main()
