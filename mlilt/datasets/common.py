"""What every benchmark module shares: the retrieval set it reads into, the layout lookups,
the line reader, and the report its ``verify`` writes."""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlilt.data.images import ImageRef
from mlilt.errors import DataError

_SHOW = 10  # names shown in a summary before "... and N more"


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

    @classmethod
    def empty(cls, benchmark: str, language: str, images_missing_on_disk: int) -> "RetrievalSet":
        return cls(benchmark, language, [], [], [], [], {
            "images_missing_on_disk": images_missing_on_disk, "images_without_language": 0,
            "captions_empty": 0, "captions_dropped_not_first": 0})

    def add_image(self, ref: ImageRef, key: str, texts: list[str] | None, captions: str) -> None:
        """Add one image and its captions, counting whatever is left out."""
        texts = [t.strip() for t in texts or []]
        kept = [t for t in texts if t]
        self.counts["captions_empty"] += len(texts) - len(kept)
        if not kept:  # no caption in this language: not part of this language's gallery
            self.counts["images_without_language"] += 1
            return
        if captions == "first":
            self.counts["captions_dropped_not_first"] += len(kept) - 1
            kept = kept[:1]
        self.images.append(ref)
        self.image_keys.append(key)
        self.captions.extend(kept)
        self.caption_image.extend([len(self.images) - 1] * len(kept))

    def summary(self) -> str:
        left_out = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v)
        return (f"{self.benchmark}/{self.language}: {len(self.images)} images, "
                f"{len(self.captions)} captions" + (f" (left out: {left_out})" if left_out else ""))


# --------------------------------------------------------------------------- layout


def find_folder(root: Path, name: str, marker: str) -> Path | None:
    """``root/name`` or ``root`` itself, whichever holds the file ``marker`` (None if neither)."""
    for folder in (root / name, root):
        if (folder / marker).is_file():
            return folder
    return None


def locate(root: Path, name: str, marker: str) -> Path:
    """The benchmark folder (see :func:`find_folder`), or DataError saying where it looked."""
    folder = find_folder(root, name, marker)
    if folder is not None:
        return folder
    looked = "\n  ".join(str(p) for p in (root / name / marker, root / marker))
    raise DataError(f"{name}: no {marker} under {root}; expected the layout "
                    f"<root>/{name}/{marker} (see mlilt.datasets.{name}). Looked for:\n  {looked}")


def image_dir(folder: Path, names: Sequence[str]) -> Path:
    """The first existing image folder among ``names``; the first name if none exists yet."""
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return folder / names[0]  # every image then counts as missing, which is reported


def read_lines(path: Path) -> list[str]:
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


# --------------------------------------------------------------------------- line-aligned benchmarks


@dataclass(frozen=True)
class AlignedLayout:
    """A benchmark where line i of each language's caption file captions line i of an image list."""

    name: str
    languages: tuple[str, ...]
    image_list: str  # file name of the image list inside the benchmark folder
    image_dirs: tuple[str, ...]  # where the images may lie, first choice first
    caption_file: Callable[[Path, str], Path]  # (folder, lang) -> caption file, or DataError

    def folder(self, root: Path) -> Path:
        return locate(root, self.name, self.image_list)

    def image_names(self, folder: Path) -> list[str]:
        return [n.strip() for n in read_lines(folder / self.image_list)]

    def captions(self, folder: Path, lang: str, count: int) -> list[str]:
        """The caption lines of ``lang``; DataError unless there is one per listed image."""
        path = self.caption_file(folder, lang)
        texts = read_lines(path)
        if len(texts) != count:
            raise DataError(f"{path} has {len(texts)} lines but {folder / self.image_list} lists {count} "
                            "images; line i of the captions must caption image i")
        return texts

    def load(self, root: Path, langs: list[str], captions: str) -> dict[str, RetrievalSet]:
        folder = self.folder(root)
        names = self.image_names(folder)
        images = image_dir(folder, self.image_dirs)
        # One ref per image, shared by every language, so its content hash is computed once.
        refs = {n: ImageRef.from_path(images / n) for n in names if n and (images / n).is_file()}
        sets = {}
        for lang in langs:
            texts = self.captions(folder, lang, len(names))
            rs = RetrievalSet.empty(self.name, lang, sum(n not in refs for n in names))
            for image_name, text in zip(names, texts):
                if image_name in refs:
                    rs.add_image(refs[image_name], image_name, [text], captions)
            sets[lang] = rs
        return sets

    def verify(self, root: Path, expected: int | None) -> VerifyReport:
        """Check the image list, a line-aligned caption file per language, and the images."""
        folder = find_folder(root, self.name, self.image_list) or root / self.name
        report = VerifyReport(self.name, folder, expected)
        if not (folder / self.image_list).is_file():
            report.errors.append(f"{folder / self.image_list} not found")
            return report
        try:
            names = self.image_names(folder)
        except DataError as exc:
            report.errors.append(str(exc))
            return report
        listed = [n for n in names if n]
        report.caption_entries = len(listed)
        for lang in self.languages:
            try:
                self.captions(folder, lang, len(names))
            except DataError as exc:
                report.errors.append(str(exc))
        images = image_dir(folder, self.image_dirs)
        report.missing_images = [n for n in listed if not (images / n).is_file()]
        report.found_images = len(listed) - len(report.missing_images)
        return report


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    """What a benchmark folder holds compared with what it should hold."""

    benchmark: str
    folder: Path
    expected_images: int | None  # None: no fixed number is expected
    found_images: int = 0
    caption_entries: int = 0
    missing_images: list[str] = field(default_factory=list)  # captioned but no image file
    extra_files: list[str] = field(default_factory=list)  # image files nobody captions
    errors: list[str] = field(default_factory=list)  # malformed lines, missing caption files
    not_fetched: list[str] = field(default_factory=list)  # "url: why"
    notes: list[str] = field(default_factory=list)  # what the user has to do (not a failure)

    @property
    def ok(self) -> bool:
        count_ok = self.expected_images is None or self.found_images == self.expected_images
        return count_ok and not (self.missing_images or self.extra_files or self.errors or self.not_fetched)

    def summary(self) -> str:
        expected = f" (expected {self.expected_images})" if self.expected_images is not None else ""
        lines = [f"{self.benchmark} in {self.folder}: {'OK' if self.ok else 'INCOMPLETE'}",
                 f"  images found: {self.found_images}{expected}",
                 f"  caption entries: {self.caption_entries}"]
        for title, items in (("could not be fetched", self.not_fetched),
                             ("errors", self.errors),
                             ("captioned but no image file", self.missing_images),
                             ("image files without a caption entry", self.extra_files)):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines.extend(f"    {item}" for item in items[:_SHOW])
                if len(items) > _SHOW:
                    lines.append(f"    ... and {len(items) - _SHOW} more")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)
