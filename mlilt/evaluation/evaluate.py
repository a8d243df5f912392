"""``mlilt eval`` as a library call: which packs, which benchmark, which languages."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlilt.errors import UsageError
from mlilt.evaluation.runner import EvalResult, EvalSettings, ImageSpace, evaluate_sets, plan_languages
from mlilt.packs import PACK_CONFIG, Pack, read_pack

LOCAL_BENCHMARKS = ("demo", "custom", "zeroshot")


@dataclass
class PairsRetrievalSet:
    """A retrieval set made from pairs files (the demo test split, a user's held-out data)."""

    benchmark: str
    language: str
    images: list
    captions: list[str]
    caption_image: list[int]
    counts: dict = field(default_factory=dict)


def find_packs(paths: list[str]) -> list[Pack]:
    """Packs named directly, or every pack folder inside a folder of packs."""
    packs = []
    for path in paths:
        folder = Path(path)
        if folder.is_dir() and not (folder / PACK_CONFIG).exists():
            inside = sorted(p for p in folder.iterdir() if (p / PACK_CONFIG).is_file())
            if not inside:
                raise UsageError(f"{folder} holds no pack folders (folders with {PACK_CONFIG})")
            packs += [read_pack(p) for p in inside]
        else:
            packs.append(read_pack(path))
    return packs


def benchmark_sets(benchmark: str, root: str | None, langs: list[str], captions: str, data: str | None) -> dict:
    if benchmark == "demo":
        return {lang: _pairs_set("demo", Path(_need(root, "--root")) / lang / "test.jsonl", lang) for lang in langs}
    if benchmark == "custom":
        return {lang: _pairs_set("custom", Path(_need(data, "--data")), lang) for lang in langs}
    if benchmark == "zeroshot":
        from mlilt.evaluation.zeroshot import load_zeroshot
        return {lang: load_zeroshot(_need(root, "--root"), lang) for lang in langs}
    from mlilt.datasets import load_benchmark
    return load_benchmark(benchmark, _need(root, "--root"), langs, captions=captions)


def available_languages(benchmark: str, root: str | None, data: str | None) -> list[str]:
    if benchmark == "demo":
        folder = Path(_need(root, "--root"))
        return sorted(p.parent.name for p in folder.glob("*/test.jsonl"))
    if benchmark == "custom":
        from mlilt.data.pairs import read_pairs
        return sorted(read_pairs(_need(data, "--data"), check_images=False).summary()["langs"])
    if benchmark == "zeroshot":
        from mlilt.evaluation.zeroshot import zeroshot_languages
        return zeroshot_languages(_need(root, "--root"))
    from mlilt.datasets import benchmark_languages
    return benchmark_languages(benchmark)


def evaluate(benchmark: str, packs: list[str], root: str | None = None, langs: list[str] | None = None,
             captions: str = "first", data: str | None = None, references: list[str] = (), batch_size: int = 64,
             device: str = "cpu", progress=None) -> list[EvalResult]:
    """Evaluate packs (and open_clip reference models) on ``benchmark``, one image pass per image side.

    ``device``: cpu, cuda, cuda:N or auto; ``progress``: ``task(description, total)`` yielding
    ``advance(n)`` (``EvalSettings``), told about images and captions as they are embedded.
    """
    loaded = find_packs(packs) if packs else []
    if not loaded and not references:
        raise UsageError("name at least one --pack or --reference")
    available = available_languages(benchmark, root, data)
    plan = plan_languages([p.config.language for p in loaded], langs, available) if loaded else {}
    reference_langs = _reference_languages(plan, langs, available)
    needed = sorted({lang for chosen in plan.values() for lang in chosen} | set(reference_langs if references else []))
    unknown = [lang for lang in needed if lang not in available]
    if unknown:
        raise UsageError(f"{benchmark} has no language {', '.join(unknown)}; it has: {', '.join(available)}")
    sets = benchmark_sets(benchmark, root, needed, captions, data)
    run = _Run(EvalSettings(batch_size, progress), _device(device))
    return _evaluate_packs(loaded, plan, sets, run) + _evaluate_references(references, reference_langs, sets, run)


@dataclass
class _Run:
    settings: EvalSettings
    device: torch.device
    # image-side id -> its embeddings, shared by the packs and references on it
    spaces: dict[str, ImageSpace] = field(default_factory=dict)

    def space(self, space_id: str, build) -> ImageSpace:
        if space_id not in self.spaces:  # one image pass per image side
            self.spaces[space_id] = ImageSpace(build().to(self.device), settings=self.settings)
        return self.spaces[space_id]


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: give cpu, cuda, cuda:N or auto") from None


def _evaluate_packs(loaded: list[Pack], plan: dict[int, list[str]], sets: dict, run: _Run) -> list[EvalResult]:
    from mlilt.modeling.factory import image_side_of
    from mlilt.speed import text_side_of

    results = []
    for index, chosen in plan.items():
        pack = loaded[index]
        space = run.space(pack.config.image_side_id, lambda: image_side_of(pack))
        results += evaluate_sets(text_side_of(pack).to(run.device), space, [sets[lang] for lang in chosen],
                                 pack.path.name, str(pack.path))
    return results


def _evaluate_references(references: list[str], langs: list[str], sets: dict, run: _Run) -> list[EvalResult]:
    """open_clip models; one whose image space packs were anchored on shares their image embeddings."""
    from mlilt.evaluation.reference import reference_sides
    from mlilt.packs import side_id

    results = []
    for spec in references:
        text, image = reference_sides(spec)
        space = run.space(side_id(image.base_fingerprint, image.own_state()), lambda: image)
        name, _, pretrained = spec.partition(":")
        results += evaluate_sets(text.to(run.device), space, [sets[lang] for lang in langs], name, pretrained)
    return results


def _reference_languages(plan: dict[int, list[str]], langs: list[str] | None, available: list[str]) -> list[str]:
    """A reference model runs on the languages the packs run on, else on what --langs names."""
    if plan:
        return sorted({lang for chosen in plan.values() for lang in chosen})
    if not langs:
        raise UsageError("with only --reference models, say which languages: --langs sw,en or --langs all")
    return list(available) if langs == ["all"] else list(langs)


def _pairs_set(benchmark: str, path: Path, lang: str) -> PairsRetrievalSet:
    from mlilt.data.pairs import read_pairs

    return pairs_retrieval_set(benchmark, read_pairs(path, lang=lang), lang)


def pairs_retrieval_set(benchmark: str, pairs, lang: str) -> PairsRetrievalSet:
    from mlilt.data.split import Split

    split = Split.from_pairs(pairs)
    return PairsRetrievalSet(benchmark, lang, split.images, split.captions, split.caption_image)


def _need(value, option: str):
    if not value:
        raise UsageError(f"this benchmark needs {option}")
    return value
