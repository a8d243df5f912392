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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlilt.studies.cell import current_result, demo_root, teacher_pack
from mlilt.studies.config import Cell, StudyConfig
from mlilt.errors import DataError, UsageError


@dataclass
class StudyRun:
    done: list[str] = field(default_factory=list)  # finished before this run
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> its log file


def prepare_data(study: StudyConfig, out: Path) -> None:
    """Generate the demo data once per study folder (every cell and every rerun shares it), and
    with a ``parallel:`` section the demo parallel sentences."""
    if study.data.demo is None:
        return
    from mlilt.demo.data import generate_demo

    root, wanted = demo_root(out), _demo_args(study)
    marker = root / "demo.json"
    if marker.exists():
        written = json.loads(marker.read_text(encoding="utf-8"))
        same = all(written.get(k if k != "scenes" else "n") == v for k, v in wanted.items() if k != "langs")
        if not same or not set(wanted["langs"]) <= set(written.get("langs", [])):
            raise UsageError(f"{root} holds demo data made with other settings than {study.path} asks for; "
                             f"delete {root} or choose another --out")
    else:
        args = dict(wanted)
        generate_demo(root, args.pop("langs"), n=args.pop("scenes"), **args)
    if study.parallel is not None and study.parallel.train is None:
        for lang in study.parallel.languages:
            _demo_parallel(study, out, lang)


def _demo_parallel(study: StudyConfig, out: Path, lang: str) -> None:
    """Teacher-language<TAB>student-language captions of text-only scenes: a seed other than the
    images', and no sentence that captions any of the study's images (train or test)."""
    from mlilt.demo.data import caption_scene, make_scenes
    from mlilt.files import atomic

    spec, demo = study.parallel, _demo_args(study)
    path = spec.file(lang, demo_root(out))
    wanted = {"seed": _parallel_seed(study), "lines": max(spec.sizes), "source": spec.teacher_lang, "target": lang}
    marker = path.with_suffix(".json")
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == wanted:
        return
    taken = set()
    for split in ("train", "test"):
        for other in (spec.teacher_lang, lang):
            captions = demo_root(out) / other / f"{split}.jsonl"
            taken |= {json.loads(line)["caption"] for line in captions.read_text(encoding="utf-8").splitlines()}
    lines, seen, count = [], set(), 2 * wanted["lines"]
    while len(lines) < wanted["lines"]:
        scenes = make_scenes(count, seed=wanted["seed"], image_size=demo["image_size"])
        lines, seen = [], set()
        for scene in scenes:
            pair = (caption_scene(scene, spec.teacher_lang, wanted["seed"]), caption_scene(scene, lang, wanted["seed"]))
            if pair[0] not in taken and pair[1] not in taken and pair not in seen:
                seen.add(pair)
                lines.append("\t".join(pair))
        if count > 50 * wanted["lines"]:
            raise DataError(f"{path}: the demo lexicons give only {len(lines)} parallel sentences apart from the "
                            f"study's captions; choose parallel.sizes of at most that")
        count *= 2
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "\n".join(lines[:wanted["lines"]]) + "\n")
    atomic.write_text(marker, json.dumps(wanted, sort_keys=True) + "\n")


def _parallel_seed(study: StudyConfig) -> int:
    spec = study.parallel
    return spec.seed if spec.seed is not None else int(study.data.demo.get("seed", 0)) + 1


def _demo_args(study: StudyConfig) -> dict:
    demo = study.data.demo
    return {"langs": study.all_languages(), "scenes": int(demo.get("scenes", 1000)), "seed": int(demo.get("seed", 0)),
            "test_fraction": float(demo.get("test_fraction", 0.2)), "image_size": int(demo.get("image_size", 224))}


def check_budgets(study: StudyConfig, out: Path) -> None:
    """Every budget must fit every language's pool, and every parallel size its file; say so
    before hours of training."""
    from mlilt.data.pairs import read_pairs

    wanted = {lang: list(study.budgets_of(lang)) for lang in study.languages}
    for lang in (study.parallel.languages if study.parallel else []):
        wanted[lang] = wanted.get(lang, []) + [b for b in study.parallel.with_pairs if b]
    for lang, budgets in wanted.items():
        if not budgets:
            continue
        source = study.data.train_file(lang, demo_root(out))
        available = len(read_pairs(source, lang=lang, check_images=False))
        too_big = sorted({b for b in budgets if b > available})
        if too_big:
            raise DataError(f"{source}: {available} pairs for {lang}, fewer than the budgets "
                            f"{', '.join(map(str, too_big))} in {study.path}")
    if study.parallel is not None:
        _check_parallel_sizes(study, out)


def _check_parallel_sizes(study: StudyConfig, out: Path) -> None:
    from mlilt.data.parallel import read_parallel

    for lang in study.parallel.languages:
        source = study.parallel.file(lang, demo_root(out))
        available = len(read_parallel(source))
        too_big = [size for size in study.parallel.sizes if size > available]
        if too_big:
            raise DataError(f"{source}: {available} parallel pairs for {lang}, fewer than parallel.sizes "
                            f"{', '.join(map(str, too_big))} in {study.path}")


def is_done(study: StudyConfig, out: Path, cell: Cell) -> bool:
    return current_result(study, out, cell) is not None


def pending_cells(study: StudyConfig, out: Path, force: bool = False) -> list[Cell]:
    """Cells to run, in study order: those not done, and a done teacher whose kept pack is gone
    while one of its students still has to learn from it."""
    todo = [cell for cell in study.cells() if force or not is_done(study, out, cell)]
    needed = {study.teacher_of(cell) for cell in todo if cell.parallel}
    lost = {t for t in needed if t not in todo and not teacher_pack(study, out, t).is_dir()}
    return [cell for cell in study.cells() if cell in todo or cell in lost]


def run_study(study: StudyConfig, out: Path, jobs: int = 1, force: bool = False, log=print) -> StudyRun:
    prepare_data(study, out)
    check_budgets(study, out)
    run = StudyRun()
    pending = pending_cells(study, out, force)
    run.done = [cell.id for cell in study.cells() if cell not in pending]
    log(f"{study.name}: {len(study.cells())} cells, {len(run.done)} already done, {len(pending)} to run "
        f"({jobs} at a time)")
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)
    interrupted = threading.Event()  # Ctrl-C reaches the cells too: launch nothing more
    # A student starts once its teacher has finished; cells run in study order, teachers first,
    # so a worker waiting on a teacher never holds up the teacher itself.
    finished = {cell: threading.Event() for cell in pending}
    overall = _Overall(len(pending))

    def launch(cell: Cell) -> None:
        try:
            _launch(cell)
        finally:
            finished[cell].set()

    def _launch(cell: Cell) -> None:
        teacher = study.teacher_of(cell)
        if teacher in finished:
            finished[teacher].wait()
        if interrupted.is_set():
            return
        if teacher is not None and teacher.id in run.failed:
            run.failed[cell.id] = run.failed[teacher.id]
            log(f"  FAILED {cell.id}: its teacher {teacher.id} failed")
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
            log(f"  done   {cell.id}  {_headline(current_result(study, out, cell), cell)}  {overall.step()}")
        else:
            run.failed[cell.id] = str(log_file)
            log(f"  FAILED {cell.id} (exit {code}); see {log_file}  {overall.step()}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            list(pool.map(launch, pending))
        except KeyboardInterrupt:
            interrupted.set()
            raise
    if not interrupted.is_set():
        release_teachers(study, out)
    return run


class _Overall:
    """The study's progress as a whole: cells finished of those to run, time so far, time left
    at the pace so far."""

    def __init__(self, total: int):
        self.total, self.finished, self.started = total, 0, time.monotonic()
        self.lock = threading.Lock()

    def step(self) -> str:
        with self.lock:
            self.finished += 1
            elapsed = time.monotonic() - self.started
            left = elapsed / self.finished * (self.total - self.finished)
            return f"[{self.finished}/{self.total}, {_minutes(elapsed)} so far, ~{_minutes(left)} left]"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def release_teachers(study: StudyConfig, out: Path) -> None:
    """Delete kept teacher packs no pending student needs (unless keep_packs): the results are the
    record, and a rerun that needs a teacher again retrains it."""
    folder = out / "teachers"
    if study.keep_packs or not folder.is_dir():
        return
    import shutil

    needed = {teacher_pack(study, out, study.teacher_of(cell)) for cell in study.cells()
              if cell.parallel and not is_done(study, out, cell)}
    for kept in folder.iterdir():
        if kept not in needed:
            shutil.rmtree(kept)
    if not any(folder.iterdir()):
        folder.rmdir()


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
