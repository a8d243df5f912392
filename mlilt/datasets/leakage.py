"""Find training pairs that leak a benchmark's test data, and drop them.

Two kinds of leak are looked for:

* **captions**: a training caption that is (nearly) a benchmark caption of the language being
  checked, scored with sentence chrF (sacrebleu, 0-100). A pair is flagged when its best
  score reaches ``threshold``.
* **images**: a training image whose file bytes equal a benchmark image's (sha256 content
  hash, :func:`~mlilt.data.images.image_id`), whatever the file is called.

Speed: thousands of training captions against thousands of benchmark captions would be
millions of chrF calls, so chrF only scores a few candidates per training caption:

1. Captions are normalised (case folded, whitespace collapsed). Identical normalised texts are
   found by hashing (a dict lookup) and score 100 without calling chrF.
2. Every normalised caption becomes its set of character 3-grams, taken with whitespace
   removed (as chrF removes it). Both sides become sparse 0/1 matrices, and one product per
   chunk of training captions gives the shared 3-gram count ``s`` of every (train, benchmark)
   pair. From it comes a cheap stand-in for chrF: the F-beta (beta = 2, chrF's own weighting,
   recall counting four times precision) of 3-gram precision ``s/|train|`` and recall
   ``s/|bench|``, which simplifies to ``5 s / (|train| + 4 |bench|)``. Plain Jaccard was tried
   first and ranks badly when a short benchmark caption sits inside a long training caption
   (chrF is high through recall, Jaccard low through the size difference).
3. Per training caption the ``CANDIDATES`` (20) benchmark captions of highest overlap, among
   those at or above ``OVERLAP_FLOOR`` (0.1), are scored with chrF; the best is kept. A caption
   with no candidate is not a leak.

Why this does not miss leaks: a pair at the default threshold (80) shares most of its
character n-grams, so its 3-gram overlap is high and it ranks at or near the top of its row;
twenty candidates leave room for the other benchmark captions built on the same template. A
pair under the floor (under 10% weighted 3-gram overlap) scores far below any useful
threshold. The tests compare against brute-force chrF over every pair on templated demo
captions (the hardest case: many near neighbours) at thresholds 50, 70 and 85. The prefilter
is a heuristic, not a bound: with ten candidates, one Swahili demo caption (of 480, against
120) had its best match, chrF 69, outside them; with twenty none did, down to threshold 30. At low
thresholds on heavily templated text a best match can still fall outside the twenty.
Scores are computed on the normalised texts, so a leak differing only in case or spacing is
not underrated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mlilt.data.images import ImageRef, image_id
from mlilt.data.pairs import PairSet, read_pairs
from mlilt.datasets import BENCHMARKS, load_benchmark
from mlilt.errors import DataError, UsageError

CANDIDATES = 20  # benchmark captions scored with chrF per training caption
OVERLAP_FLOOR = 0.1  # 3-gram F2 overlap below this is never a candidate
LEAK_BENCHMARKS = (*BENCHMARKS, "demo", "custom")
_CHUNK = 512  # training captions per sparse product, bounds memory to CHUNK x benchmark size


@dataclass(frozen=True)
class CaptionLeak:
    """A training caption close to a benchmark caption."""

    train_caption: str
    benchmark_caption: str
    score: float  # sentence chrF of the normalised texts, 0-100
    train_source: str  # where the training pair came from ("train.jsonl:12")
    index: int  # the pair's index in ``train.pairs``

    def __iter__(self):  # unpacks as (train caption, benchmark caption, score, train source)
        return iter((self.train_caption, self.benchmark_caption, self.score, self.train_source))


@dataclass(frozen=True)
class ImageLeak:
    """A training image byte-identical to a benchmark image."""

    train_source: str
    benchmark_key: str  # the benchmark's image key (xm3600 key, file name, ...)
    index: int

    def __iter__(self):  # unpacks as (train source, benchmark image key)
        return iter((self.train_source, self.benchmark_key))


@dataclass
class LeakReport:
    """What :func:`find_leaks` found; ``leaky_indices`` index ``train.pairs``."""

    benchmark: str
    lang: str
    threshold: float
    train_pairs: int
    benchmark_captions: int
    benchmark_images: int
    caption_leaks: list[CaptionLeak] = field(default_factory=list)
    image_leaks: list[ImageLeak] = field(default_factory=list)

    @property
    def leaky_indices(self) -> list[int]:
        return sorted({leak.index for leak in self.caption_leaks} | {leak.index for leak in self.image_leaks})

    @property
    def counts(self) -> dict[str, int]:
        return {"caption_leaks": len(self.caption_leaks), "image_leaks": len(self.image_leaks),
                "leaky_pairs": len(self.leaky_indices)}

    @property
    def clean(self) -> bool:
        return not self.caption_leaks and not self.image_leaks

    def summary(self) -> str:
        c = self.counts
        head = (f"{self.benchmark}/{self.lang}: {self.train_pairs} training pairs checked against "
                f"{self.benchmark_captions} captions and {self.benchmark_images} images (chrF >= {self.threshold:g})")
        if self.clean:
            return head + ": no leaks"
        return (head + f": {c['caption_leaks']} caption leak(s), {c['image_leaks']} image leak(s), "
                f"{c['leaky_pairs']} pair(s) to drop")


# --------------------------------------------------------------------------- benchmark side


@dataclass
class _Benchmark:
    captions: list[str]
    images: list[ImageRef]
    keys: list[str]


def _load(benchmark: str, root, lang: str, data) -> _Benchmark:
    if benchmark in ("demo", "custom"):
        if benchmark == "demo":
            if root is None:
                raise UsageError("benchmark demo needs root= (a `mlilt data demo` folder)")
            path = Path(root) / lang / "test.jsonl"
            if not path.is_file():
                raise DataError(f"demo: no {path} (is {root} a `mlilt data demo` folder with language {lang}?)")
        else:
            source = data if data is not None else root
            if source is None:
                raise UsageError("benchmark custom needs data= (a pairs file)")
            path = source
        pairs = read_pairs(path, lang=lang, check_images=False).pairs
        keys: dict[ImageRef, str] = {}
        for pair in pairs:
            keys.setdefault(pair.image, pair.image.path.name if pair.image.path is not None else pair.image.name)
        return _Benchmark([p.caption for p in pairs], list(keys), list(keys.values()))
    if benchmark not in LEAK_BENCHMARKS:
        raise UsageError(f"unknown benchmark {benchmark!r}; choose one of: {', '.join(LEAK_BENCHMARKS)}")
    if root is None:
        raise UsageError(f"benchmark {benchmark} needs root= (the folder holding it)")
    rs = load_benchmark(benchmark, root, [lang], captions="all")[lang]
    return _Benchmark(list(rs.captions), list(rs.images), list(rs.image_keys))


# --------------------------------------------------------------------------- captions


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _trigrams(text: str) -> set[str]:
    squeezed = "".join(text.split())
    if len(squeezed) < 3:
        return {squeezed} if squeezed else set()
    return {squeezed[i:i + 3] for i in range(len(squeezed) - 2)}


def _matrix(grams: Sequence[set[str]], vocab: dict[str, int], grow: bool):
    from scipy import sparse

    rows, cols = [], []
    for row, items in enumerate(grams):
        for gram in items:
            col = vocab.get(gram)
            if col is None:
                if not grow:
                    continue
                col = vocab[gram] = len(vocab)
            rows.append(row)
            cols.append(col)
    values = np.ones(len(rows), dtype=np.float32)
    return sparse.csr_matrix((values, (rows, cols)), shape=(len(grams), max(len(vocab), 1)))


def candidates(train: Sequence[str], bench: Sequence[str], k: int = CANDIDATES,
               floor: float = OVERLAP_FLOOR) -> list[list[int]]:
    """Per normalised training caption, up to ``k`` benchmark indices by 3-gram F2 overlap >= ``floor``."""
    if not train or not bench:
        return [[] for _ in train]
    vocab: dict[str, int] = {}
    bench_grams = [_trigrams(t) for t in bench]
    bench_m = _matrix(bench_grams, vocab, grow=True)
    bench_sizes = np.array([len(g) for g in bench_grams], dtype=np.float32)
    bench_t = bench_m.T.tocsc()
    out: list[list[int]] = []
    for start in range(0, len(train), _CHUNK):
        grams = [_trigrams(t) for t in train[start:start + _CHUNK]]
        sizes = np.array([len(g) for g in grams], dtype=np.float32)
        shared = (_matrix(grams, vocab, grow=False) @ bench_t).toarray()
        # F-beta (beta=2) of 3-gram precision s/|train| and recall s/|bench|: 5s / (|train| + 4|bench|)
        denominator = sizes[:, None] + 4.0 * bench_sizes[None, :]
        overlap = np.divide(5.0 * shared, denominator, out=np.zeros_like(shared), where=denominator > 0)
        for row in overlap:
            top = np.argpartition(-row, min(k, len(row)) - 1)[:k] if len(row) > k else np.arange(len(row))
            top = top[np.argsort(-row[top], kind="stable")]
            out.append([int(i) for i in top if row[i] >= floor])
    return out


def _caption_leaks(train: PairSet, bench_captions: list[str], threshold: float) -> list[CaptionLeak]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    bench_norm = [_normalise(c) for c in bench_captions]
    exact: dict[str, int] = {}
    for index, text in enumerate(bench_norm):
        exact.setdefault(text, index)
    leaks: list[CaptionLeak] = []
    # Score each distinct normalised training caption once; many pairs may share one.
    distinct: dict[str, list[int]] = {}
    for index, pair in enumerate(train.pairs):
        distinct.setdefault(_normalise(pair.caption), []).append(index)
    fuzzy = [text for text in distinct if text not in exact]
    best: dict[str, tuple[float, int]] = {text: (100.0, exact[text]) for text in distinct if text in exact}
    for text, cands in zip(fuzzy, candidates(fuzzy, bench_norm)):
        scored = [(chrf.sentence_score(text, [bench_norm[j]]).score, j) for j in cands]
        if scored:
            best[text] = max(scored, key=lambda s: (s[0], -s[1]))
    for text, indices in distinct.items():
        if text in best and best[text][0] >= threshold:
            score, j = best[text]
            for index in indices:
                pair = train.pairs[index]
                leaks.append(CaptionLeak(pair.caption, bench_captions[j], float(score), pair.source, index))
    leaks.sort(key=lambda leak: leak.index)
    return leaks


# --------------------------------------------------------------------------- images


def _image_leaks(train: PairSet, bench: _Benchmark) -> list[ImageLeak]:
    by_hash: dict[str, str] = {}
    for ref, key in zip(bench.images, bench.keys):
        try:
            by_hash.setdefault(image_id(ref), key)
        except DataError:  # a benchmark image that cannot be read cannot be leaked
            continue
    leaks = []
    for index, pair in enumerate(train.pairs):
        key = by_hash.get(image_id(pair.image, pair.source))
        if key is not None:
            leaks.append(ImageLeak(pair.source, key, index))
    return leaks


# --------------------------------------------------------------------------- public API


def find_leaks(train: PairSet, benchmark: str, root: str | os.PathLike | None, lang: str,
               threshold: float = 80.0, data: str | os.PathLike | None = None) -> LeakReport:
    """Training pairs that leak ``benchmark``'s ``lang`` test captions or images.

    ``benchmark``: xm3600, xtd10, multi30k (``root`` holds it, as for
    :func:`~mlilt.datasets.load_benchmark`; every caption is checked), ``demo``
    (``root`` is a ``mlilt data demo`` folder; its ``<lang>/test.jsonl`` is the benchmark) or
    ``custom`` (``data``, or else ``root``, is a pairs file). Every training caption is checked,
    whatever its language, and every training image.
    """
    if not isinstance(train, PairSet):
        raise UsageError(f"train must be a PairSet (from read_pairs), got {type(train).__name__}")
    if not isinstance(lang, str) or not lang.strip():
        raise UsageError(f"lang must be a non-empty language code, got {lang!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 100:
        raise UsageError(f"threshold must be a chrF score between 0 and 100, got {threshold!r}")
    bench = _load(benchmark, root, lang.strip(), data)
    return LeakReport(
        benchmark=benchmark, lang=lang.strip(), threshold=float(threshold), train_pairs=len(train),
        benchmark_captions=len(bench.captions), benchmark_images=len(bench.images),
        caption_leaks=_caption_leaks(train, bench.captions, float(threshold)),
        image_leaks=_image_leaks(train, bench),
    )


def exclude_leaks(train: PairSet, report: LeakReport) -> PairSet:
    """A new PairSet without the report's leaky pairs; ``skipped["leak"]`` counts them."""
    drop = set(report.leaky_indices)
    if drop and max(drop) >= len(train.pairs):
        raise UsageError("this leak report was made for another (longer) pair set")
    kept = [pair for index, pair in enumerate(train.pairs) if index not in drop]
    skipped = dict(train.skipped)
    if drop:
        skipped["leak"] = skipped.get("leak", 0) + len(drop)
    return PairSet(kept, train.source, skipped)
