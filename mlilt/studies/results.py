"""A study's finished cells as flat rows, and the aggregates the report and plots read.

One row per (cell, evaluated language); ``parallel`` is a student's count of parallel sentences
(0 for other cells). Seeds are aggregated as mean ± sample std.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlilt.studies.cell import current_result
from mlilt.studies.config import StudyConfig

METRICS = ("image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
           "text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10", "mean_recall")
COLUMNS = ("study", "cell_id", "train_lang", "eval_lang", "transfer", "method", "budget", "parallel", "seed",
           *METRICS,
           "trainable_params", "trainable_percent", "pack_bytes", "train_wall_s", "train_cpu_s", "samples_per_s",
           "peak_rss_mb", "gpu_peak_mb", "best_epoch", "command")


def finished(study: StudyConfig, out: Path):
    """(cell, result) of every cell whose result matches the current config; stale ones are ignored."""
    for cell in study.cells():
        result = current_result(study, out, cell)
        if result is not None:
            yield cell, result


def load_rows(study: StudyConfig, out: Path) -> list[dict]:
    return [row for _cell, result in finished(study, out) for row in _rows(study.name, result)]


def _rows(study: str, result: dict) -> list[dict]:
    cell = result["cell"]
    base = {"study": study, "cell_id": result["cell_id"], "train_lang": cell["lang"], "method": cell["method"],
            "budget": cell["budget"], "parallel": cell.get("parallel", 0), "seed": cell["seed"],
            "trainable_params": result["trainable"]["params"],
            "trainable_percent": result["trainable"]["percent"], "pack_bytes": result["pack_bytes"],
            "train_wall_s": result["train_wall_s"], "train_cpu_s": result["train_cpu_s"],
            "samples_per_s": result["samples_per_s"],
            "peak_rss_mb": result["peak_rss_mb"], "gpu_peak_mb": result["gpu_peak_mb"],
            "best_epoch": result["best_epoch"], "command": result["command"]}
    return [base | {"eval_lang": lang, "transfer": lang != cell["lang"]} | {m: ev["metrics"][m] for m in METRICS}
            for lang, ev in result["eval"].items()]


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None with a single seed
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "")


def stat(values: list[float]) -> Stat:
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def group(rows: list[dict], value: str, *keys: str) -> dict[tuple, Stat]:
    """``value`` over seeds (and anything else not in ``keys``), keyed by the ``keys`` columns."""
    buckets: dict[tuple, list[float]] = {}
    for row in rows:
        if row[value] is not None:
            buckets.setdefault(tuple(row[k] for k in keys), []).append(float(row[value]))
    return {key: stat(values) for key, values in buckets.items()}


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def own_language(rows: list[dict]) -> list[dict]:
    return [row for row in rows if not row["transfer"]]


def plain(rows: list[dict]) -> list[dict]:
    """Rows of cells trained on image-caption pairs alone (no parallel sentences)."""
    return [row for row in rows if not row["parallel"]]


def load_histories(study: StudyConfig, out: Path) -> dict[tuple, list[dict]]:
    """Per-epoch training history of each finished pairs-only cell: (method, lang, budget, seed) -> rows."""
    return {(cell.method, cell.lang, cell.budget, cell.seed): result["history"]
            for cell, result in finished(study, out) if not cell.parallel}
