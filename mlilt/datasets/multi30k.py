"""Multi30K task 1, the test 2016 Flickr split: 1,000 Flickr30k images, one caption each in 4 languages.

Layout: ``<root>/multi30k/test_2016_flickr.txt`` (image file names, as
``data/task1/image_splits/test_2016_flickr.txt`` of the official repository),
``<root>/multi30k/test_2016_flickr.<lang>`` (or ``.<lang>.gz``; line i captions image i) and the
images in ``<root>/multi30k/images/`` or ``<root>/multi30k/flickr30k-images/``.

Nothing is downloaded: the Flickr30k images need the user to accept their terms, so the user
fetches the data and :func:`verify` checks what is there.
"""
from __future__ import annotations

import os
from pathlib import Path

from mlilt.datasets.common import AlignedLayout, RetrievalSet, VerifyReport
from mlilt.errors import DataError

NAME = "multi30k"
LANGUAGES = "en de fr cs".split()
IMAGES = 1000
IMAGE_LIST = "test_2016_flickr.txt"


def _caption_file(folder: Path, lang: str) -> Path:
    plain = folder / f"test_2016_flickr.{lang}"
    gz = folder / f"test_2016_flickr.{lang}.gz"  # the official repository ships them gzipped
    path = gz if gz.is_file() and not plain.is_file() else plain
    if not path.is_file():
        raise DataError(f"{NAME}: caption file {path} not found")
    return path


LAYOUT = AlignedLayout(NAME, tuple(LANGUAGES), IMAGE_LIST, ("images", "flickr30k-images"), _caption_file)


def load(root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
    """One :class:`RetrievalSet` per language in ``langs`` (see :func:`mlilt.datasets.load_benchmark`)."""
    return LAYOUT.load(root, langs, captions)


def verify(root: str | os.PathLike) -> VerifyReport:
    """Check ``<root>/multi30k``: the image list, a line-aligned caption file per language, the images."""
    return LAYOUT.verify(Path(root), IMAGES)
