"""How long the README's commands take on this machine, run as a new user runs them.

    python benchmarks/load/first_hour.py [--workdir DIR]

Each command runs in a new process with an empty mlilt cache (so the first one converts the
offline text tower), in this order: the demo; demo data; an English pack anchored on the
committed Swahili pack (the text side trains, image features are computed once); a Swahili
pack of the default method (both sides train); evaluating the anchored pack. Prints a table of
wall seconds per command.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "perf")]  # mlilt from this checkout
from _common import machine, scratch_dir  # noqa: E402


def commands(work: Path) -> list[tuple[str, list[str]]]:
    data, packs = work / "data", work / "packs"
    return [
        ("demo (first run: converts me5-small)", ["mlilt", "demo", "--out", str(work / "demo-out")]),
        ("demo data, 1,000 scenes", ["mlilt", "data", "demo", "--langs", "en,sw", "--out", str(data)]),
        ("train en anchored on langpacks/sw", ["mlilt", "train", "--lang", "en", "--data",
                                               str(data / "en" / "train.jsonl"), "--out", str(packs / "en"),
                                               "--anchor", str(ROOT / "langpacks" / "sw")]),
        ("train sw, default method (both sides)", ["mlilt", "train", "--lang", "sw", "--data",
                                                   str(data / "sw" / "train.jsonl"), "--out", str(packs / "sw")]),
        ("eval the en pack on the demo test split", ["mlilt", "eval", "--benchmark", "demo", "--root", str(data),
                                                     "--pack", str(packs / "en")]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = scratch_dir("mlilt-first-hour", args.workdir)
    env = {**os.environ, "MLILT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    rows = []
    for label, command in commands(work):
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"{shlex.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        rows.append((label, seconds))
        print(f"{label}: {seconds:.0f} s", flush=True)
    print(f"\nmachine: {machine()}")
    print("| command | wall |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()
