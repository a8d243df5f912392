"""One cell of a study, run in its own process: subsample the budget, train, evaluate, record.

Running each cell in a fresh process makes its peak memory its own and lets cells run side
by side; everything it needs comes from the config and the cell id, so the command recorded
with the result reruns it.
"""
from __future__ import annotations

import json
import platform
import random
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path

from mlilt.files import atomic
from mlilt.studies.config import Cell, StudyConfig
from mlilt.errors import DataError

RESULT_VERSION = 1


def cells_dir(out: Path) -> Path:
    return out / "cells"


def result_path(out: Path, cell: Cell) -> Path:
    return cells_dir(out) / f"{cell.id}.json"


def current_result(study: StudyConfig, out: Path, cell: Cell) -> dict | None:
    """The cell's result if it was written by this format for the current config, else None."""
    try:
        result = json.loads(result_path(out, cell).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    current = result.get("version") == RESULT_VERSION and result.get("cell_hash") == study.cell_hash(cell)
    return result if current else None


def demo_root(out: Path) -> Path:
    return out / "data"


def teacher_pack(study: StudyConfig, out: Path, teacher: Cell) -> Path:
    """Where a teacher cell's pack is kept for its students; the config hash in the name means a
    stale teacher's pack is never taught from."""
    return out / "teachers" / f"{teacher.id}-{study.cell_hash(teacher)}"


def parallel_file(study: StudyConfig, out: Path, cell: Cell) -> Path:
    return study.parallel.file(cell.lang, demo_root(out))


def rerun_command(study: StudyConfig, out: Path, cell: Cell) -> str:
    return shlex.join(["mlilt", "bench", "--config", str(study.path), "--out", str(out), "--cell", cell.id, "--force"])


def budget_pairs(study: StudyConfig, out: Path, cell: Cell) -> list:
    """The first ``budget`` pairs of a seeded shuffle: a larger budget holds every smaller one."""
    from mlilt.data.pairs import read_pairs

    source = study.data.train_file(cell.lang, demo_root(out))
    pairs = read_pairs(source, lang=cell.lang).pairs
    if cell.budget > len(pairs):
        raise DataError(f"{source}: cell {cell.id} wants {cell.budget} pairs but there are only {len(pairs)} "
                        f"for language {cell.lang}")
    order = list(range(len(pairs)))
    random.Random(f"budget-{cell.seed}").shuffle(order)
    return [pairs[i] for i in sorted(order[:cell.budget])]


def student_sentences(study: StudyConfig, out: Path, cell: Cell, work: Path) -> Path:
    """The first ``cell.parallel`` pairs of the study's parallel file, as JSON Lines in ``work``
    (a larger size holds every smaller one)."""
    from mlilt.data.parallel import read_parallel

    source = parallel_file(study, out, cell)
    found = read_parallel(source)
    if cell.parallel > len(found):
        raise DataError(f"{source}: cell {cell.id} wants {cell.parallel} parallel pairs but there are only "
                        f"{len(found)}")
    rows = [json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
            for s, t in zip(found.sources[:cell.parallel], found.targets[:cell.parallel])]
    path = work / "parallel.jsonl"
    path.write_text("".join(rows), encoding="utf-8")
    return path


def write_budget(pairs: list, work: Path) -> Path:
    """The cell's pairs as JSONL with absolute image paths (in-memory images written out first)."""
    rows = []
    for pair in pairs:
        image = pair.image
        if image.path is None:
            image_file = work / "images" / f"{image.id}.img"
            image_file.parent.mkdir(exist_ok=True)
            image_file.write_bytes(image.data)
            path = image_file
        else:
            path = image.path.resolve()
        rows.append(json.dumps({"image": str(path), "caption": pair.caption, "lang": pair.lang},
                               ensure_ascii=False) + "\n")
    data = work / "train.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    return data


def run_cell(study: StudyConfig, out: Path, cell: Cell, console=None) -> dict:
    """Train and evaluate one cell; write its result JSON atomically and return it."""
    work = out / "work" / cell.id
    if work.exists():
        shutil.rmtree(work)  # a previous attempt's leftovers: the cell starts over
    work.mkdir(parents=True)
    data = write_budget(budget_pairs(study, out, cell), work) if cell.budget else None
    distill = _distill_settings(study, out, cell, work) if cell.parallel else {}
    trained = _train(study, cell, data, work / "pack", console, distill)
    result = {"version": RESULT_VERSION, "study": study.name, "cell_id": cell.id,
              "cell_hash": study.cell_hash(cell), "cell": vars(cell) | {"eval_langs": study.eval_languages(cell)},
              "command": rerun_command(study, out, cell), **trained,
              **_evaluate(study, out, cell, trained["pack"]), "machine": _machine()}
    if distill:
        result["teacher"] = {"cell_id": study.teacher_of(cell).id, "pack": distill["teacher"]}
    if cell in study.teachers():  # its students learn from this pack: keep it where they look
        _keep(Path(trained["pack"]), teacher_pack(study, out, cell))
    if not study.keep_packs:
        shutil.rmtree(work)
    atomic.write_text(result_path(out, cell), json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _keep(pack: Path, kept: Path) -> None:
    """Copy ``pack`` to ``kept`` whole or not at all (a student never reads half a teacher)."""
    staged = kept.with_name(kept.name + ".partial")
    for leftover in (staged, kept):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(pack, staged)
    staged.rename(kept)


def _distill_settings(study: StudyConfig, out: Path, cell: Cell, work: Path) -> dict:
    """A student's TrainConfig options: its sentences and its teacher cell's kept pack."""
    teacher = study.teacher_of(cell)
    pack = teacher_pack(study, out, teacher)
    if not pack.is_dir():
        raise DataError(f"cell {cell.id} learns from teacher cell {teacher.id}, whose pack {pack} is not there; "
                        f"run the teacher first: {rerun_command(study, out, teacher)}")
    return {"parallel": (str(student_sentences(study, out, cell, work)),), "teacher": str(pack)}


def _train(study: StudyConfig, cell: Cell, data: Path | None, pack_out: Path, console, distill: dict) -> dict:
    from mlilt.training.trainer import train
    from mlilt.training.config import TrainConfig

    settings = study.train_settings(cell.method)
    if "steps" in settings:  # an epoch goes through the image-caption pairs, else the sentences
        settings["epochs"] = epochs_for_steps(settings.pop("steps"), cell.budget or cell.parallel, settings)
    config = TrainConfig(lang=cell.lang, data=str(data) if data else None, out=str(pack_out), method=cell.method,
                         text_tower=study.text_tower, image_tower=study.image_tower, seed=cell.seed,
                         overwrite=True, **settings, **distill)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    result = train(config, console=console)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    trainable = result.report.to_dict()["towers"]
    train_rows = [row for row in result.history if row.get("epoch", 0) >= 1]
    steps_seconds = sum(row["seconds"] for row in train_rows)
    samples = sum(row["samples_per_s"] * row["seconds"] for row in train_rows)
    return {"pack": str(result.pack), "pack_bytes": _folder_bytes(result.pack),
            "trainable": _trainable_summary(trainable), "train_wall_s": round(seconds, 2),
            "train_cpu_s": round(cpu_seconds, 2),
            "train_steps_s": round(steps_seconds, 2), "samples_per_s": round(samples / max(steps_seconds, 1e-9), 2),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "gpu_peak_mb": _gpu_peak_mb(),
            "best_epoch": next(r["epoch"] for r in result.history if r["val"] == result.metrics),
            "history": result.history, "settings": config.to_dict()}


def epochs_for_steps(steps: int, budget: int, settings: dict) -> int:
    """Epochs that give at least ``steps`` optimizer steps on this budget (pairs, or parallel
    sentences when they set the epoch): every budget gets the same compute, so small budgets are
    not also starved of steps."""
    from mlilt.training.config import TrainConfig

    holdout = settings.get("holdout", TrainConfig.holdout)
    train_pairs = budget - (holdout if holdout >= 1 else round(budget * holdout))
    batch = settings.get("batch_size", TrainConfig.batch_size)
    steps_per_epoch = max(1, int(train_pairs) // batch)
    return max(1, -(-steps // steps_per_epoch))


def _trainable_summary(towers: dict) -> dict:
    trainable = sum(t["trainable"] for t in towers.values())
    total = sum(t["total"] for t in towers.values())
    return {"params": trainable, "of_towers": total, "percent": round(100.0 * trainable / max(total, 1), 4),
            "sides": towers}


def _evaluate(study: StudyConfig, out: Path, cell: Cell, pack_path: str) -> dict:
    """Retrieval of the cell's pack on its own language and the transfer languages, and its time."""
    import torch

    from mlilt.modeling.factory import image_side_of
    from mlilt.speed import text_side_of
    from mlilt.evaluation.evaluate import benchmark_sets
    from mlilt.evaluation.runner import ImageSpace, evaluate_sets
    from mlilt.packs import read_pack

    spec = study.evaluate
    root = str(demo_root(out)) if spec.benchmark == "demo" else spec.root
    langs = study.eval_languages(cell)
    sets = benchmark_sets(spec.benchmark, str(Path(root).expanduser()) if root else None, langs, spec.captions,
                          spec.data)
    pack = read_pack(pack_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # embeddings come back to the CPU for retrieval
    started = time.perf_counter()
    results = evaluate_sets(text_side_of(pack).to(device), ImageSpace(image_side_of(pack).to(device)),
                            [sets[lang] for lang in langs], pack.path.name, pack_path)
    return {"eval": {r.language: {"benchmark": r.benchmark, "metrics": r.metrics, "counts": r.counts}
                     for r in results}, "eval_s": round(time.perf_counter() - started, 2)}


def _folder_bytes(folder: Path) -> int:
    from mlilt.packs import PACK_CONFIG, PACK_TENSORS

    return sum((Path(folder) / name).stat().st_size for name in (PACK_CONFIG, PACK_TENSORS))


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): less swayed than wall time by other jobs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _gpu_peak_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _machine() -> dict:
    import os

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
