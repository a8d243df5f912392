"""Run a study: prepare its data, run each pending cell in its own process, write the report.

Results are written per cell, atomically, so an interrupted study loses at most the cells
that were running; a rerun skips every cell whose result matches the current config.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlilt.studies.cell import current_result, demo_root
from mlilt.studies.config import Cell, StudyConfig
from mlilt.errors import DataError, UsageError


@dataclass
class StudyRun:
    done: list[str] = field(default_factory=list)  # finished before this run
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> its log file


def prepare_data(study: StudyConfig, out: Path) -> None:
    """Generate the demo data once per study folder (every cell and every rerun shares it)."""
    if study.data.demo is None:
        return
    from mlilt.demo.data import generate_demo

    root, wanted = demo_root(out), _demo_args(study)
    marker = root / "demo.json"
    if marker.exists():
        written = json.loads(marker.read_text(encoding="utf-8"))
        same = all(written.get(k if k != "scenes" else "n") == v for k, v in wanted.items() if k != "langs")
        if same and set(wanted["langs"]) <= set(written.get("langs", [])):
            return
        raise UsageError(f"{root} holds demo data made with other settings than {study.path} asks for; "
                         f"delete {root} or choose another --out")
    args = dict(wanted)
    generate_demo(root, args.pop("langs"), n=args.pop("scenes"), **args)


def _demo_args(study: StudyConfig) -> dict:
    demo = study.data.demo
    return {"langs": study.all_languages(), "scenes": int(demo.get("scenes", 1000)), "seed": int(demo.get("seed", 0)),
            "test_fraction": float(demo.get("test_fraction", 0.2)), "image_size": int(demo.get("image_size", 224))}


def check_budgets(study: StudyConfig, out: Path) -> None:
    """Every budget must fit every language's pool; say so before hours of training."""
    from mlilt.data.pairs import read_pairs

    for lang in study.languages:
        source = study.data.train_file(lang, demo_root(out))
        available = len(read_pairs(source, lang=lang, check_images=False))
        too_big = [b for b in study.budgets if b > available]
        if too_big:
            raise DataError(f"{source}: {available} pairs for {lang}, fewer than the budgets "
                            f"{', '.join(map(str, too_big))} in {study.path}")


def is_done(study: StudyConfig, out: Path, cell: Cell) -> bool:
    return current_result(study, out, cell) is not None


def run_study(study: StudyConfig, out: Path, jobs: int = 1, force: bool = False, log=print) -> StudyRun:
    prepare_data(study, out)
    check_budgets(study, out)
    run = StudyRun()
    pending = []
    for cell in study.cells():
        if not force and is_done(study, out, cell):
            run.done.append(cell.id)
        else:
            pending.append(cell)
    log(f"{study.name}: {len(study.cells())} cells, {len(run.done)} already done, {len(pending)} to run "
        f"({jobs} at a time)")
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)
    interrupted = threading.Event()  # Ctrl-C reaches the cells too: launch nothing more

    def launch(cell: Cell) -> None:
        if interrupted.is_set():
            return
        slot = slots.get()
        try:
            code, log_file = _run_cell_process(study, out, cell, slot, jobs)
        finally:
            slots.put(slot)
        if code in (130, -signal.SIGINT):
            interrupted.set()
            log(f"  interrupted {cell.id}: finished cells are kept; rerun to continue")
        elif code == 0:
            run.ran.append(cell.id)
            log(f"  done   {cell.id}  {_headline(current_result(study, out, cell), cell)}")
        else:
            run.failed[cell.id] = str(log_file)
            log(f"  FAILED {cell.id} (exit {code}); see {log_file}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            list(pool.map(launch, pending))
        except KeyboardInterrupt:
            interrupted.set()
            raise
    return run


def _run_cell_process(study: StudyConfig, out: Path, cell: Cell, slot: int, jobs: int) -> tuple[int, Path]:
    log_file = out / "logs" / f"{cell.id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlilt", "bench", "--config", str(study.path), "--out", str(out),
               "--cell", cell.id, "--force"]
    with open(log_file, "w", encoding="utf-8") as sink:
        sink.write(" ".join(command) + "\n")
        sink.flush()
        process = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=_cell_env(slot, jobs))
    return process.returncode, log_file


def _cell_env(slot: int, jobs: int) -> dict:
    """Cells side by side share the cores evenly, and take one GPU each, round robin."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    gpus = _visible_gpus(env)
    if gpus and jobs > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def _visible_gpus(env: dict) -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _headline(result: dict, cell: Cell) -> str:
    own = result["eval"][cell.lang]["metrics"]
    return (f"mean recall {own['mean_recall']:.1f}, {result['trainable']['percent']:.3f}% trainable, "
            f"{result['train_wall_s']:.0f} s")
