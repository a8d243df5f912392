"""Readers for the public multilingual image-text retrieval benchmarks, as they lie on disk.

Each reader turns one benchmark into a :class:`RetrievalSet` per language: a gallery of
images, the captions, and for every caption the index of its image. Nothing is downloaded:
the user fetches the data and points ``root`` at it.

Layouts (``root`` may be the folder that holds ``<name>/`` or that folder itself):

``xm3600`` (Crossmodal-3600, as CLIP_benchmark lays it out)
    ``<root>/xm3600/captions.jsonl`` and ``<root>/xm3600/images/<key>.jpg``. One JSON object
    per line: ``{"image/key": "<16 hex>", "image/locale": "..", "<lang>": {"caption": [...],
    "caption/tokenized": [...], "caption/tokenized/lowercase": [...]}, ...}`` for 36 languages.
    Only ``caption`` is read (the tokenized forms are derived from it).

``xtd10`` (XTD10, the 1k COCO train2014 test images of the XTD paper)
    ``<root>/xtd10/test_image_names.txt`` (one COCO file name per line),
    ``<root>/xtd10/test_1kcaptions_<lang>.txt`` (line i captions image i) and the images in
    ``<root>/xtd10/images/`` or ``<root>/xtd10/train2014/``. de and fr captions may also come
    from the MIC set (``MIC/test_1kcaptions_<lang>.txt``) and jp from STAIR
    (``STAIR/test_1kcaptions_jp.txt``), as the XTD10 repository ships them; a top-level file
    wins when both exist.

``multi30k`` (Multi30K task 1, test 2016 Flickr split)
    ``<root>/multi30k/test_2016_flickr.txt`` (image file names, as
    ``data/task1/image_splits/test_2016_flickr.txt`` of the official repository),
    ``<root>/multi30k/test_2016_flickr.<lang>`` (or ``.<lang>.gz``; line i captions image i) and
    the images in ``<root>/multi30k/images/`` or ``<root>/multi30k/flickr30k-images/``.

Protocol: ``captions="first"`` keeps only the first caption of each image (CLIP_benchmark's
choice for XM3600, giving one caption per image); ``captions="all"`` keeps every caption, each a
positive for its image (NLLB-CLIP, MTEB). XTD10 and Multi30K have one caption per image, so
both choices give the same set. Each language gets its own gallery: an image with no caption in
a language is left out of that language's gallery, because an uncaptionable image would only be
a distractor that other languages do not see. Whatever is left out is counted in ``counts``
and summarised in a warning, so a partial download never passes for a full benchmark.
"""
from __future__ import annotations

import gzip
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlilt.data.images import ImageRef
from mlilt.errors import DataError, UsageError

XM3600_LANGUAGES = ("ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt "
                    "quz ro ru sv sw te th tr uk vi zh").split()
XTD10_LANGUAGES = "de en es fr it jp ko pl ru tr zh".split()
MULTI30K_LANGUAGES = "en de fr cs".split()
CAPTION_CHOICES = ("first", "all")

# Counts that mean data the benchmark should have is not there: these are warned about.
# "captions_dropped_not_first" is the protocol at work, not a problem, so it is only counted.
_MISSING_KEYS = ("images_missing_on_disk", "images_without_language", "captions_empty")
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class RetrievalSet:
    """One language of one benchmark, ready for :func:`~mlilt.evaluation.retrieval.retrieval_metrics`."""

    benchmark: str
    language: str
    images: list[ImageRef]
    image_keys: list[str]
    captions: list[str]
    caption_image: list[int]
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        left_out = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v)
        return (f"{self.benchmark}/{self.language}: {len(self.images)} images, "
                f"{len(self.captions)} captions" + (f" (left out: {left_out})" if left_out else ""))


# --------------------------------------------------------------------------- shared helpers


def _locate(root: Path, name: str, marker: str) -> Path:
    """The benchmark folder: ``root/name`` or ``root`` itself, whichever holds ``marker``."""
    candidates = [root / name / marker, root / marker]
    for path in candidates:
        if path.is_file():
            return path.parent
    looked = "\n  ".join(str(p) for p in candidates)
    raise DataError(f"{name}: no {marker} under {root}; expected the layout "
                    f"<root>/{name}/{marker} (see mlilt.datasets.benchmarks). Looked for:\n  {looked}")


def _image_dir(folder: Path, names: Sequence[str]) -> Path:
    """The first existing image folder among ``names``; the first name if none exists yet."""
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return folder / names[0]  # every image then counts as missing, which the warning reports


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 (optionally gzipped) text file, without line ends."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    # splitlines() would also split on U+2028 and friends, which can occur inside a caption.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


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


def _warn_if_incomplete(sets: dict[str, RetrievalSet]) -> None:
    incomplete = [s.summary() for s in sets.values() if any(s.counts.get(k) for k in _MISSING_KEYS)]
    if incomplete:
        warnings.warn("benchmark data is incomplete:\n  " + "\n  ".join(incomplete), stacklevel=3)


# --------------------------------------------------------------------------- xm3600


def _parse_xm3600_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("image/key"), str):
        raise DataError(f"{where}: expected a JSON object with a string \"image/key\"")
    if not _KEY_RE.match(row["image/key"]):
        raise DataError(f"{where}: \"image/key\" {row['image/key']!r} is not 16 lowercase hex digits")
    return row


def _xm3600_captions(row: dict, lang: str, where: str) -> list[str] | None:
    """The captions of ``lang`` on one line, or None if the line lacks the language."""
    entry = row.get(lang)
    if entry is None:
        return None
    captions = entry.get("caption") if isinstance(entry, dict) else None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: \"{lang}\" should be an object whose \"caption\" is a list of strings")
    return captions


def _read_xm3600_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) per non-blank line; duplicate keys are an error, they would double images."""
    rows, seen = [], {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = _parse_xm3600_line(line, where)
        key = row["image/key"]
        if key in seen:
            raise DataError(f"{where}: image/key {key} already appeared on line {seen[key]}")
        seen[key] = number
        rows.append((where, row))
    return rows


def _load_xm3600(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    folder = _locate(root, "xm3600", "captions.jsonl")
    images = _image_dir(folder, ["images"])
    rows = _read_xm3600_rows(folder / "captions.jsonl")
    present = [(w, r) for w, r in rows if (images / f"{r['image/key']}.jpg").is_file()]
    missing = len(rows) - len(present)
    sets = {}
    for lang in langs:
        rs = RetrievalSet("xm3600", lang, [], [], [], [], {
            "images_missing_on_disk": missing, "images_without_language": 0,
            "captions_empty": 0, "captions_dropped_not_first": 0})
        for where, row in present:
            _add_image(rs, images / f"{row['image/key']}.jpg", row["image/key"],
                       _xm3600_captions(row, lang, where), captions)
        sets[lang] = rs
    return sets


def _add_image(rs: RetrievalSet, path: Path, key: str, texts: list[str] | None, captions: str) -> None:
    """Add one image and its captions to ``rs``, counting whatever is left out."""
    texts = [t.strip() for t in texts or []]
    kept = [t for t in texts if t]
    rs.counts["captions_empty"] += len(texts) - len(kept)
    if not kept:  # no caption in this language: not part of this language's gallery
        rs.counts["images_without_language"] += 1
        return
    if captions == "first":
        rs.counts["captions_dropped_not_first"] += len(kept) - 1
        kept = kept[:1]
    rs.images.append(ImageRef.from_path(path))
    rs.image_keys.append(key)
    rs.captions.extend(kept)
    rs.caption_image.extend([len(rs.images) - 1] * len(kept))


# --------------------------------------------------------------------------- line-aligned benchmarks


def _load_aligned(name: str, folder: Path, image_list: Path, caption_file: Callable[[str], Path],
                  image_dirs: Sequence[str], langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    """Benchmarks where line i of each caption file captions line i of an image list."""
    names = [n.strip() for n in _read_lines(image_list)]
    images = _image_dir(folder, image_dirs)
    on_disk = [bool(n) and (images / n).is_file() for n in names]
    sets = {}
    for lang in langs:
        path = caption_file(lang)
        texts = _read_lines(path)
        if len(texts) != len(names):
            raise DataError(f"{path} has {len(texts)} lines but {image_list} lists {len(names)} images; "
                            "line i of the captions must caption image i")
        rs = RetrievalSet(name, lang, [], [], [], [], {
            "images_missing_on_disk": on_disk.count(False), "images_without_language": 0,
            "captions_empty": 0, "captions_dropped_not_first": 0})
        for image_name, text, present in zip(names, texts, on_disk):
            if present:
                _add_image(rs, images / image_name, image_name, [text], captions)
        sets[lang] = rs
    return sets


def _missing_caption_file(path: Path, name: str) -> Path:
    if not path.is_file():
        raise DataError(f"{name}: caption file {path} not found")
    return path


XTD10_SUBSETS = {"de": "MIC", "fr": "MIC", "jp": "STAIR"}  # where the repository keeps these


def _xtd10_caption_file(folder: Path, lang: str) -> Path:
    name = f"test_1kcaptions_{lang}.txt"
    candidates = [folder / name] + ([folder / XTD10_SUBSETS[lang] / name] if lang in XTD10_SUBSETS else [])
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DataError(f"xtd10: caption file for {lang} not found; looked for "
                        + ", ".join(str(path) for path in candidates))
    return found


def _load_xtd10(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    folder = _locate(root, "xtd10", "test_image_names.txt")
    return _load_aligned(
        "xtd10", folder, folder / "test_image_names.txt",
        lambda lang: _xtd10_caption_file(folder, lang),
        ["images", "train2014"], langs, captions)


def _multi30k_caption_file(folder: Path, lang: str) -> Path:
    plain = folder / f"test_2016_flickr.{lang}"
    gz = folder / f"test_2016_flickr.{lang}.gz"  # the official repository ships them gzipped
    return _missing_caption_file(gz if gz.is_file() and not plain.is_file() else plain, "multi30k")


def _load_multi30k(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    folder = _locate(root, "multi30k", "test_2016_flickr.txt")
    return _load_aligned(
        "multi30k", folder, folder / "test_2016_flickr.txt",
        lambda lang: _multi30k_caption_file(folder, lang),
        ["images", "flickr30k-images"], langs, captions)


# --------------------------------------------------------------------------- public API

BENCHMARKS = {
    "xm3600": (XM3600_LANGUAGES, _load_xm3600),
    "xtd10": (XTD10_LANGUAGES, _load_xtd10),
    "multi30k": (MULTI30K_LANGUAGES, _load_multi30k),
}


def benchmark_languages(name: str) -> list[str]:
    """The language codes of a benchmark, in the benchmark's own spelling (xtd10 uses ``jp``)."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return list(BENCHMARKS[name][0])


def load_benchmark(name: str, root: str | Path, langs: Sequence[str] | None = None,
                   captions: str = "first") -> dict[str, RetrievalSet]:
    """Read benchmark ``name`` under ``root``: one :class:`RetrievalSet` per language.

    ``langs`` None or ``["all"]`` means every language. ``captions`` is ``"first"`` or ``"all"``
    (see the module docstring). Missing images and languages are counted and warned about.
    """
    chosen = _choose_languages(name, langs)
    if captions not in CAPTION_CHOICES:
        raise UsageError(f"captions={captions!r}: choose one of {', '.join(CAPTION_CHOICES)}")
    sets = BENCHMARKS[name][1](Path(root), chosen, captions)
    _warn_if_incomplete(sets)
    return sets
