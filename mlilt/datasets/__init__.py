"""The public multilingual image-text retrieval benchmarks, one module per benchmark.

Each module (:mod:`~mlilt.datasets.xm3600`, :mod:`~mlilt.datasets.xtd10`,
:mod:`~mlilt.datasets.multi30k`) holds its language list, its on-disk layout and reader
(``load``), a ``verify`` of a folder and, where the data may be fetched, ``download``. This
registry maps names to them.

A reader turns one benchmark into a :class:`RetrievalSet` per language: a gallery of images,
the captions, and for every caption the index of its image. ``root`` may be the folder that
holds ``<name>/`` or that folder itself.

Protocol: ``captions="first"`` keeps only the first caption of each image (CLIP_benchmark's
choice for XM3600, giving one caption per image); ``captions="all"`` keeps every caption, each a
positive for its image (NLLB-CLIP, MTEB). XTD10 and Multi30K have one caption per image, so
both choices give the same set. Each language gets its own gallery: an image with no caption in
a language is left out of that language's gallery, because an uncaptionable image would only be
a distractor that other languages do not see. Whatever is left out is counted in ``counts``
and summarised in a warning, so a partial download never passes for a full benchmark.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

from mlilt.datasets import multi30k, xm3600, xtd10
from mlilt.datasets.common import RetrievalSet, VerifyReport
from mlilt.errors import UsageError

BENCHMARKS: dict[str, ModuleType] = {module.NAME: module for module in (xm3600, xtd10, multi30k)}
CAPTION_CHOICES = ("first", "all")
XM3600_LANGUAGES = xm3600.LANGUAGES
# name -> download(root, progress, overwrite): the benchmarks mlilt can fetch
DOWNLOADS = {name: module.download for name, module in BENCHMARKS.items() if hasattr(module, "download")}

# Counts that mean data the benchmark should have is not there: these are warned about.
# "captions_dropped_not_first" is the protocol at work, not a problem, so it is only counted.
_MISSING_KEYS = ("images_missing_on_disk", "images_without_language", "captions_empty")

__all__ = ["BENCHMARKS", "CAPTION_CHOICES", "XM3600_LANGUAGES", "RetrievalSet", "VerifyReport",
           "benchmark_languages", "DOWNLOADS", "load_benchmark"]


def benchmark_languages(name: str) -> list[str]:
    """The language codes of a benchmark, in the benchmark's own spelling (xtd10 uses ``jp``)."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return list(BENCHMARKS[name].LANGUAGES)


def _choose_languages(name: str, langs: Sequence[str] | None) -> list[str]:
    valid = benchmark_languages(name)
    if isinstance(langs, str):  # a lone code, not a sequence of one-letter codes
        langs = [langs]
    if langs is None or list(langs) == ["all"]:
        return valid
    if not langs:
        raise UsageError(f"{name}: no language asked for; valid codes: {' '.join(valid)} (or 'all')")
    unknown = [code for code in langs if code not in valid]
    if unknown:
        raise UsageError(f"{name} has no language {', '.join(map(repr, unknown))}; "
                         f"valid codes: {' '.join(valid)} (or 'all')")
    return list(dict.fromkeys(langs))


def load_benchmark(name: str, root: str | Path, langs: Sequence[str] | None = None,
                   captions: str = "first") -> dict[str, RetrievalSet]:
    """Read benchmark ``name`` under ``root``: one :class:`RetrievalSet` per language.

    ``langs`` None or ``["all"]`` means every language. ``captions`` is ``"first"`` or ``"all"``
    (see the module docstring). Missing images and languages are counted and warned about.
    """
    chosen = _choose_languages(name, langs)
    if captions not in CAPTION_CHOICES:
        raise UsageError(f"captions={captions!r}: choose one of {', '.join(CAPTION_CHOICES)}")
    sets = BENCHMARKS[name].load(Path(root), chosen, captions)
    incomplete = [s.summary() for s in sets.values() if any(s.counts.get(k) for k in _MISSING_KEYS)]
    if incomplete:
        warnings.warn("benchmark data is incomplete:\n  " + "\n  ".join(incomplete), stacklevel=2)
    return sets
