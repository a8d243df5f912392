"""Crossmodal-3600 (XM3600): 3,600 images, captions in 36 languages.

Layout, as CLIP_benchmark lays it out: ``<root>/xm3600/captions.jsonl`` and
``<root>/xm3600/images/<key>.jpg``. One JSON object per line: ``{"image/key": "<16 hex>",
"image/locale": "..", "<lang>": {"caption": [...], "caption/tokenized": [...],
"caption/tokenized/lowercase": [...]}, ...}``. Only ``caption`` is read (the tokenized forms
are derived from it).

:func:`download` fetches the two official archives, ``captions.zip`` (one ``captions.jsonl``)
and ``images.tgz`` (3,600 ``<key>.jpg``), and unpacks both into ``<root>/xm3600/`` through a
staging folder, so the folder appears complete or not at all.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from mlilt.data.images import ImageRef
from mlilt.datasets.common import RetrievalSet, VerifyReport, find_folder, image_dir, locate, read_lines
from mlilt.datasets.fetch import Progress, extract_flat, extract_zip_member, fetch_sources
from mlilt.errors import DataError, UsageError
from mlilt.files.atomic import staged_dir

NAME = "xm3600"
LANGUAGES = ("ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt "
             "quz ro ru sv sw te th tr uk vi zh").split()
IMAGES = 3600
CAPTIONS = "captions.jsonl"
# file name under <root>/.downloads/xm3600/ -> url
SOURCES = {
    "captions.zip": "https://google.github.io/crossmodal-3600/web-data/captions.zip",
    "images.tgz": "https://open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz",
}
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


# --------------------------------------------------------------------------- reading


def _parse_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("image/key"), str):
        raise DataError(f"{where}: expected a JSON object with a string \"image/key\"")
    if not _KEY_RE.match(row["image/key"]):
        raise DataError(f"{where}: \"image/key\" {row['image/key']!r} is not 16 lowercase hex digits")
    return row


def _rows(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    """(where, row) per non-blank line, or (where, the DataError) for a bad or repeated line.

    A repeated key is an error: it would put one image in the gallery twice.
    """
    seen: dict[str, int] = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = _parse_line(line, where)
        except DataError as exc:
            yield where, exc
            continue
        key = row["image/key"]
        if key in seen:
            yield where, DataError(f"{where}: image/key {key} already appeared on line {seen[key]}")
            continue
        seen[key] = number
        yield where, row


def _captions(row: dict, lang: str, where: str) -> list[str] | None:
    """The captions of ``lang`` on one line, or None if the line lacks the language."""
    entry = row.get(lang)
    if entry is None:
        return None
    captions = entry.get("caption") if isinstance(entry, dict) else None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: \"{lang}\" should be an object whose \"caption\" is a list of strings")
    return captions


def load(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    """One :class:`RetrievalSet` per language in ``langs`` (see :func:`mlilt.datasets.load_benchmark`)."""
    folder = locate(root, NAME, CAPTIONS)
    images = image_dir(folder, ["images"])
    rows = []
    for where, row in _rows(folder / CAPTIONS):
        if isinstance(row, DataError):
            raise row
        rows.append((where, row))
    # One ref per image, shared by every language, so its content hash is computed once.
    present = [(where, row, ImageRef.from_path(images / f"{row['image/key']}.jpg")) for where, row in rows
               if (images / f"{row['image/key']}.jpg").is_file()]
    sets = {}
    for lang in langs:
        rs = RetrievalSet.empty(NAME, lang, len(rows) - len(present))
        for where, row, ref in present:
            rs.add_image(ref, row["image/key"], _captions(row, lang, where), captions)
        sets[lang] = rs
    return sets


# --------------------------------------------------------------------------- verification


def verify(root: str | os.PathLike, expected: int | None = IMAGES) -> VerifyReport:
    """Check ``<root>/xm3600``: image count, caption lines parse, keys and images match."""
    root = Path(root)
    folder = find_folder(root, NAME, CAPTIONS) or root / NAME
    report = VerifyReport(NAME, folder, expected)
    images = folder / "images"
    on_disk = {p.stem: p.name for p in images.glob("*.jpg")} if images.is_dir() else {}
    report.found_images = len(on_disk)
    keys: set[str] = set()
    if not (folder / CAPTIONS).is_file():
        report.errors.append(f"{folder / CAPTIONS} not found")
    else:
        try:
            for _, row in _rows(folder / CAPTIONS):
                if isinstance(row, DataError):
                    report.errors.append(str(row))
                else:
                    keys.add(row["image/key"])
        except DataError as exc:  # the file itself is unreadable
            report.errors.append(str(exc))
    report.caption_entries = len(keys)
    report.missing_images = sorted(k for k in keys if k not in on_disk)
    report.extra_files = sorted(on_disk[stem] for stem in on_disk if stem not in keys)
    if images.is_dir():
        report.extra_files += sorted(p.name for p in images.iterdir() if p.suffix != ".jpg")
    return report


# --------------------------------------------------------------------------- download + unpack


def unpack(captions_zip: str | os.PathLike, images_tgz: str | os.PathLike, root: str | os.PathLike,
           expected: int | None = IMAGES, overwrite: bool = False) -> VerifyReport:
    """Unpack the two official archives into ``<root>/xm3600/`` and verify the result.

    The folder appears only once both archives are unpacked; any refused member or unreadable
    archive leaves ``root`` as it was. An existing ``xm3600`` folder is replaced only with
    ``overwrite``.
    """
    captions_zip, images_tgz, root = Path(captions_zip), Path(images_tgz), Path(root)
    target = root / NAME
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
    with staged_dir(target, replace=overwrite) as stage:
        extract_zip_member(captions_zip, CAPTIONS, stage / CAPTIONS)
        (stage / "images").mkdir()
        extract_flat(images_tgz, stage / "images", ".jpg")
    return verify(root, expected=expected)


def download(root: str | os.PathLike, progress: Progress | None = None, overwrite: bool = False) -> VerifyReport:
    """Fetch, unpack and verify Crossmodal-3600 under ``root``.

    ``progress(label, done, total)`` reports each file's bytes. What could not be fetched is in
    the report's ``not_fetched`` (and ``ok`` is then False); run again to resume.
    """
    root = Path(root)
    target = root / NAME
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; use --overwrite to download and replace it")
    got, failed = fetch_sources(SOURCES, root / ".downloads" / NAME, progress)
    if failed:
        report = verify(root) if target.exists() else VerifyReport(NAME, target, IMAGES)
        report.not_fetched = failed
        report.notes.append(f"nothing was unpacked; run again to resume the downloads in {root / '.downloads'}")
        return report
    return unpack(got["captions.zip"], got["images.tgz"], root, overwrite=overwrite)
