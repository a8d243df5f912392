"""Evaluate packs on retrieval benchmarks, fast across languages.

Image embeddings are computed once per image side (tower + anchor) for the union of every
language's gallery — through the on-disk feature cache — and reused for every language and
every pack on that image side. The captions of all languages a text side is evaluated on are
encoded in one pass, sorted by token count and padded per batch.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from mlilt.files import atomic
from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.images import image_id
from mlilt.data.pairs import UNDETERMINED
from mlilt.modeling.encode import encode_texts
from mlilt.errors import UsageError
from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.modeling.model import SideEncoder


@dataclass
class EvalResult:
    benchmark: str
    language: str
    model: str  # the pack's name (its folder name)
    pretrained: str  # where it came from (the pack path)
    metrics: dict
    counts: dict
    task: str = "zeroshot_retrieval"

    def clip_benchmark_json(self) -> dict:
        """The fields CLIP_benchmark writes, so existing tooling reads our results."""
        return {"dataset": self.benchmark, "model": self.model, "pretrained": self.pretrained,
                "task": self.task, "metrics": self.metrics, "language": self.language,
                "counts": self.counts}


@dataclass
class EvalSettings:
    """How an evaluation runs: batch size, and progress (``task(description, total)``, a
    context manager yielding ``advance(n)``, as ``mlilt.training.progress.TrainProgress.task``)."""

    batch_size: int = 64
    progress: Callable | None = None

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        if self.progress is None or not total:
            yield None
            return
        with self.progress(description, total) as advance:
            yield advance


class ImageSpace:
    """Embeddings of one image side, computed once per distinct image."""

    def __init__(self, image: SideEncoder, use_cache: bool = True, settings: EvalSettings | None = None):
        self.image = image
        self.cache = FeatureCache(image.tower) if use_cache else None
        self.settings = settings or EvalSettings()
        self.embeddings: dict[str, torch.Tensor] = {}

    def add(self, images: list) -> None:
        todo = {image_id(img): img for img in images}
        todo = {key: img for key, img in todo.items() if key not in self.embeddings}
        if not todo:
            return
        with self.settings.task("images", len(todo)) as advance:
            features = tower_features(self.image.tower, list(todo.values()), batch_size=self.settings.batch_size,
                                      cache=self.cache, progress=advance)
        with torch.no_grad():
            projected = self.image.project(features.to(self.image.proj.weight.device)).float().cpu()
        self.embeddings.update(zip(todo, projected))

    def of(self, images: list) -> torch.Tensor:
        return torch.stack([self.embeddings[image_id(img)] for img in images])


def evaluate_sets(text: SideEncoder, space: ImageSpace, sets: list, model_name: str, pretrained: str) -> list[EvalResult]:
    """Retrieval metrics of one text side on each RetrievalSet (all share ``space``)."""
    for item in sets:
        space.add(item.images)  # the union first: one image-tower pass for every language
    captions = _caption_embeddings(text, sets, space.settings, model_name)
    results = []
    for index, item in enumerate(sets):
        metrics, task = _metrics(text, space, item, captions.get(index))
        results.append(EvalResult(item.benchmark, item.language, model_name, pretrained,
                                  {k: round(v, 4) for k, v in metrics.items()}, dict(item.counts), task))
    return results


def _caption_embeddings(text: SideEncoder, sets: list, settings: EvalSettings, model_name: str
                        ) -> dict[int, torch.Tensor]:
    """The captions of every retrieval set in one length-sorted pass (set index -> embeddings):
    batches then fill across languages and group captions of equal token counts."""
    from mlilt.evaluation.zeroshot import ZeroShotSet

    chosen = [i for i, item in enumerate(sets) if not isinstance(item, ZeroShotSet)]
    captions = [caption for i in chosen for caption in sets[i].captions]
    languages = ",".join(sets[i].language for i in chosen)
    with settings.task(f"captions ({model_name}: {languages})", len(captions)) as advance:
        embedded = encode_texts(text, captions, settings.batch_size, progress=advance)
    return dict(zip(chosen, torch.split(embedded, [len(sets[i].captions) for i in chosen])))


def _metrics(text: SideEncoder, space: ImageSpace, item, text_emb: torch.Tensor | None) -> tuple[dict, str]:
    from mlilt.evaluation.zeroshot import ZeroShotSet, accuracy, classifier

    if isinstance(item, ZeroShotSet):
        return accuracy(space.of(item.images), classifier(text, item), item.labels), "zeroshot_classification"
    return retrieval_metrics(text_emb, space.of(item.images), item.caption_image), "zeroshot_retrieval"


RESULT_FORMATS = ("mlilt", "clip_benchmark")
# mlilt's benchmark names -> CLIP_benchmark's dataset names, where they differ
CLIP_BENCHMARK_DATASETS = {"xm3600": "crossmodal3600"}


def write_results(results: list[EvalResult], out: Path, fmt: str = "mlilt") -> None:
    """One JSON per (benchmark, language, model), and a CSV of the run.

    ``mlilt``: ``{benchmark}_{language}_{model}.json``, recalls in %, with the counts of what was
    left out. ``clip_benchmark``: exactly what ``clip_benchmark eval`` writes, so ``clip_benchmark
    build`` and its tooling read it: its file names (``{dataset}_{pretrained}_{model}_{language}_{task}.json``),
    dataset names (``crossmodal3600``), keys and fractions in [0, 1].
    """
    if fmt not in RESULT_FORMATS:
        raise UsageError(f"--format {fmt!r}: give one of {', '.join(RESULT_FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        if fmt == "clip_benchmark":
            name, record = clip_benchmark_record(result)
        else:
            name, record = f"{result.benchmark}_{result.language}_{result.model}.json", result.clip_benchmark_json()
        atomic.write_text(out / name, json.dumps(record, indent=2, sort_keys=True) + "\n")
    atomic.write_text(out / "summary.csv", results_csv(results))


def clip_benchmark_record(result: EvalResult) -> tuple[str, dict]:
    """CLIP_benchmark's file name and JSON for one result (its ``cli.run`` naming rules)."""
    dataset = CLIP_BENCHMARK_DATASETS.get(result.benchmark, result.benchmark).replace("/", "_")
    pretrained = os.path.basename(result.pretrained) if os.path.exists(result.pretrained) else result.pretrained
    metrics = {k: v / 100 for k, v in result.metrics.items() if k != "mean_recall"}  # percent -> fraction
    record = {"dataset": dataset, "model": result.model, "pretrained": result.pretrained, "task": result.task,
              "metrics": metrics, "language": result.language}
    return f"{dataset}_{pretrained}_{result.model}_{result.language}_{result.task}.json", record


def results_csv(results: list[EvalResult]) -> str:
    metric_names = list(results[0].metrics) if results else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["benchmark", "language", "model", "pretrained", *metric_names])
    for r in results:
        writer.writerow([r.benchmark, r.language, r.model, r.pretrained, *[r.metrics[m] for m in metric_names]])
    return buffer.getvalue()


def plan_languages(pack_languages: list[str], requested: list[str] | None, available: list[str]) -> dict[int, list[str]]:
    """Which languages each pack is evaluated on (pack index -> languages).

    No --langs: each pack on its own language. One pack with --langs: that pack on each
    requested language (cross-lingual transfer). Several packs with --langs: the packs whose
    language was requested, each on its own language.
    """
    everything = requested is not None and requested == ["all"]
    if requested is None or (everything and len(pack_languages) > 1):
        plan = {i: [lang] for i, lang in enumerate(pack_languages) if lang in available}
    elif len(pack_languages) == 1:
        plan = {0: list(available) if everything else list(requested)}
    else:
        plan = {i: [lang] for i, lang in enumerate(pack_languages) if lang in requested}
    if not any(plan.values()):
        hint = ""
        if available == [UNDETERMINED]:  # a pairs file without a lang field: its rows are "und"
            hint = (f"; the data has no lang field, so its rows are '{UNDETERMINED}': pass --langs "
                    f"{UNDETERMINED} to test each pack on them, or add \"lang\": \"<code>\" to every row")
        raise UsageError(f"nothing to evaluate: packs for {', '.join(pack_languages)}, benchmark languages "
                         f"{', '.join(available[:40])}{hint}")
    return plan
