"""XTD10: the 1,000 COCO train2014 test images of the XTD paper, one caption each in 11 languages.

Layout: ``<root>/xtd10/test_image_names.txt`` (one COCO file name per line),
``<root>/xtd10/test_1kcaptions_<lang>.txt`` (line i captions image i) and the images in
``<root>/xtd10/images/`` or ``<root>/xtd10/train2014/``. de and fr captions may also come from
the MIC set (``MIC/test_1kcaptions_<lang>.txt``) and jp from STAIR
(``STAIR/test_1kcaptions_jp.txt``), as the XTD10 repository ships them; a top-level file wins
when both exist. Language codes are the repository's own (``jp``, not ``ja``).

:func:`download` fetches only the caption files (from the XTD10 repository). The images are
COCO train2014 files that mlilt does not redistribute: the user copies them, by the names in
``test_image_names.txt``, into ``<root>/xtd10/images/``; the report says how many are missing.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlilt.datasets.common import AlignedLayout, RetrievalSet, VerifyReport, image_dir
from mlilt.datasets.fetch import Progress, fetch_sources
from mlilt.errors import DataError
from mlilt.files.atomic import write_bytes

NAME = "xtd10"
LANGUAGES = "de en es fr it jp ko pl ru tr zh".split()
IMAGES = 1000
IMAGE_LIST = "test_image_names.txt"
SUBSETS = {"de": "MIC", "fr": "MIC", "jp": "STAIR"}  # where the repository keeps these as well
COCO_TRAIN2014 = "http://images.cocodataset.org/zips/train2014.zip"
_BASE = "https://raw.githubusercontent.com/adobe-research/Cross-lingual-Test-Dataset-XTD10/main/XTD10/"


def caption_name(lang: str) -> str:
    """The file name of ``lang``'s captions."""
    return f"test_1kcaptions_{lang}.txt"


# file name under <root>/.downloads/xtd10/ -> url
SOURCES = {name: _BASE + name for name in [IMAGE_LIST] + [caption_name(lang) for lang in LANGUAGES]}


def _caption_file(folder: Path, lang: str) -> Path:
    name = caption_name(lang)
    candidates = [folder / name] + ([folder / SUBSETS[lang] / name] if lang in SUBSETS else [])
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DataError(f"xtd10: caption file for {lang} not found; looked for "
                        + ", ".join(str(path) for path in candidates))
    return found


LAYOUT = AlignedLayout(NAME, tuple(LANGUAGES), IMAGE_LIST, ("images", "train2014"), _caption_file)


def load(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    """One :class:`RetrievalSet` per language in ``langs`` (see :func:`mlilt.datasets.load_benchmark`)."""
    return LAYOUT.load(root, langs, captions)


def verify(root: str | os.PathLike) -> VerifyReport:
    """Check ``<root>/xtd10``: the name list, a line-aligned caption file per language, the images."""
    report = LAYOUT.verify(Path(root), IMAGES)
    if report.missing_images:
        images = image_dir(report.folder, LAYOUT.image_dirs)
        report.notes.append(
            f"XTD10 images are COCO train2014 files that mlilt cannot download: copy the "
            f"{len(report.missing_images)} missing files named in {report.folder / IMAGE_LIST} (from the "
            f"train2014 folder of {COCO_TRAIN2014}) into {images}/")
    return report


def download(root: str | os.PathLike, progress: Progress | None = None, overwrite: bool = False) -> VerifyReport:
    """Fetch the XTD10 caption files into ``<root>/xtd10/`` and verify; images are the user's.

    Files already in ``<root>/xtd10`` (the images the user copied) are left alone; the caption
    files are (re)written atomically from the downloads, so ``overwrite`` (which replaces a
    whole XM3600 folder) changes nothing here.
    """
    root = Path(root)
    target = root / NAME
    got, failed = fetch_sources(SOURCES, root / ".downloads" / NAME, progress)
    for name, path in got.items():
        write_bytes(target / name, path.read_bytes())
    if not (target / "train2014").is_dir():
        (target / "images").mkdir(parents=True, exist_ok=True)  # where the user puts the COCO images
    report = verify(root) if (target / IMAGE_LIST).is_file() else VerifyReport(NAME, target, IMAGES)
    report.not_fetched = failed
    return report
