"""Fetch the public retrieval benchmarks and lay them out the way
:mod:`mlilt.datasets.benchmarks` reads them.

``xm3600`` (Crossmodal-3600) is fetched whole from its official locations: ``captions.zip``
(one ``captions.jsonl``) and ``images.tgz`` (3,600 ``<key>.jpg``). Both are unpacked into
``<root>/xm3600/`` through a staging folder, so the folder appears complete or not at all.

``xtd10``: only the caption files can be fetched (from the XTD10 repository). The images are
1,000 COCO train2014 files that mlilt does not redistribute: the user copies them, by the
names in ``<root>/xtd10/test_image_names.txt``, into ``<root>/xtd10/images/``. The report
says how many are still missing.

Downloads go to ``<root>/.downloads/`` and resume: a partial file ``<name>.part`` is continued
with an HTTP ``Range`` request the next time, and is renamed to ``<name>`` only when complete.
Archives are unpacked without trusting their member names: absolute paths, ``..``, links and
device files are refused, and nothing is ever written outside the target folder.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from mlilt.files.atomic import staged_dir, write_bytes
from mlilt.errors import DataError, MliltError, UsageError

XM3600_IMAGES = 3600
XTD10_IMAGES = 1000
XTD10_LANGUAGES = "de en es fr it jp ko pl ru tr zh".split()
_XTD10_BASE = "https://raw.githubusercontent.com/adobe-research/Cross-lingual-Test-Dataset-XTD10/main/XTD10/"
COCO_TRAIN2014 = "http://images.cocodataset.org/zips/train2014.zip"

# benchmark -> {file name under <root>/.downloads/<benchmark>/: url}
SOURCES: dict[str, dict[str, str]] = {
    "xm3600": {
        "captions.zip": "https://google.github.io/crossmodal-3600/web-data/captions.zip",
        "images.tgz": "https://open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz",
    },
    "xtd10": {
        "test_image_names.txt": _XTD10_BASE + "test_image_names.txt",
        **{f"test_1kcaptions_{lang}.txt": _XTD10_BASE + f"test_1kcaptions_{lang}.txt"
           for lang in XTD10_LANGUAGES},
    },
}

_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1 << 20
_SHOW = 10  # names shown in a summary before "... and N more"

Progress = Callable[[str, int, "int | None"], None]  # (label, bytes done, total bytes or None)


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- HTTP


def fetch(url: str, dest: str | os.PathLike, progress: Callable[[int, int | None], None] | None = None,
          timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if an earlier try left one.

    ``progress(done, total)`` is called as bytes arrive (``total`` None when unknown). The
    file is renamed to ``dest`` only when complete; an error leaves ``.part`` to resume from.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    retry = f"run the command again to resume (the partial file {part} is kept)"
    for attempt in (0, 1):
        have = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "mlilt", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = urlopen(Request(url, headers=headers), timeout=timeout)
        except HTTPError as exc:
            if exc.code == 416 and have and attempt == 0:  # .part is not a prefix we can extend
                part.unlink()
                continue
            raise MliltError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check the "
                             f"address or your access to it, then {retry}") from None
        except (URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise MliltError(f"cannot reach {url} ({reason}); check the network, then {retry}") from None
        with response:
            start, total = _resume_point(response, have)
            try:
                with open(part, "r+b" if start else "wb") as handle:
                    handle.seek(start)
                    handle.truncate()
                    done = start
                    if progress:
                        progress(done, total)
                    while chunk := response.read(_CHUNK):
                        handle.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except (OSError, http.client.HTTPException) as exc:
                raise MliltError(f"downloading {url} was interrupted ({exc}); {retry}") from None
        size = part.stat().st_size
        if total is not None and size != total:
            raise MliltError(f"downloading {url} stopped at {size} of {total} bytes; {retry}")
        os.replace(part, dest)
        return dest
    raise AssertionError("unreachable")


def _resume_point(response, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, full size or None) for a response to a maybe-ranged request."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if have and response.status == 206:
        match = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == have:
            full = match.group(3)
            return have, int(full) if full != "*" else (have + length if length is not None else None)
        raise MliltError(f"{response.url}: the server answered a resume request with an unexpected "
                         f"range ({response.headers.get('Content-Range')!r}); delete the .part file and retry")
    return 0, length  # 200: the server ignored Range, the body is the whole file


# --------------------------------------------------------------------------- safe unpacking


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    """The member name as a relative path, or DataError if it could escape the target."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in path.parts:
        raise DataError(f"{archive}: refusing member {name!r}: '..' in path")
    return path


def _flat_name(path: PurePosixPath, archive: Path, member: str) -> str:
    """The file name without any leading folders; hidden (``.``, ``._``) files give ''."""
    name = path.name
    return "" if not name or name.startswith(".") else name


def _extract_captions(captions_zip: Path, dest: Path) -> None:
    try:
        archive = zipfile.ZipFile(captions_zip)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{captions_zip}: not a readable zip archive ({exc}); delete it and download again") from None
    found = None
    with archive:
        for info in archive.infolist():
            path = _safe_name(info.filename, captions_zip)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no Unix type
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):  # links, devices, fifos
                raise DataError(f"{captions_zip}: refusing member {info.filename!r}: not a regular file")
            if info.is_dir() or _flat_name(path, captions_zip, info.filename) != "captions.jsonl":
                continue
            if found is not None:
                raise DataError(f"{captions_zip}: holds captions.jsonl twice ({found!r}, {info.filename!r})")
            found = info.filename
            with archive.open(info) as source, open(dest, "wb") as target:
                shutil.copyfileobj(source, target, _CHUNK)
    if found is None:
        raise DataError(f"{captions_zip}: no captions.jsonl inside")


def _extract_images(images_tgz: Path, dest: Path) -> int:
    """Copy every ``*.jpg`` member into ``dest`` (flattened); returns how many."""
    count = 0
    try:
        with tarfile.open(images_tgz, mode="r|*") as archive:
            for member in archive:
                path = _safe_name(member.name, images_tgz)
                if member.issym() or member.islnk():
                    raise DataError(f"{images_tgz}: refusing member {member.name!r}: a link")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataError(f"{images_tgz}: refusing member {member.name!r}: not a regular file")
                name = _flat_name(path, images_tgz, member.name)
                if not name.lower().endswith(".jpg"):
                    continue
                target = dest / name
                if target.exists():
                    raise DataError(f"{images_tgz}: two members flatten to the same image {name!r}")
                source = archive.extractfile(member)
                with source, open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle, _CHUNK)
                count += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{images_tgz}: not a readable tar archive ({exc}); delete it and download again") from None
    return count


def unpack_xm3600(captions_zip: str | os.PathLike, images_tgz: str | os.PathLike, root: str | os.PathLike,
                  expected: int | None = XM3600_IMAGES, overwrite: bool = False) -> VerifyReport:
    """Unpack the two official archives into ``<root>/xm3600/`` and verify the result.

    The folder appears only once both archives are unpacked; any refused member or unreadable
    archive leaves ``root`` as it was. An existing ``xm3600`` folder is replaced only with
    ``overwrite``.
    """
    captions_zip, images_tgz, root = Path(captions_zip), Path(images_tgz), Path(root)
    target = root / "xm3600"
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
    with staged_dir(target, replace=overwrite) as stage:
        _extract_captions(captions_zip, stage / "captions.jsonl")
        (stage / "images").mkdir()
        _extract_images(images_tgz, stage / "images")
    return verify_xm3600(root, expected=expected)


# --------------------------------------------------------------------------- verification


def _benchmark_folder(root: Path, name: str, marker: str) -> Path:
    return root if (root / marker).is_file() and not (root / name / marker).is_file() else root / name


def verify_xm3600(root: str | os.PathLike, expected: int | None = XM3600_IMAGES) -> VerifyReport:
    """Check ``<root>/xm3600``: image count, caption lines parse, keys and images match."""
    folder = _benchmark_folder(Path(root), "xm3600", "captions.jsonl")
    report = VerifyReport("xm3600", folder, expected)
    images = folder / "images"
    on_disk = {p.stem: p.name for p in images.glob("*.jpg")} if images.is_dir() else {}
    report.found_images = len(on_disk)
    captions = folder / "captions.jsonl"
    keys: dict[str, int] = {}
    if not captions.is_file():
        report.errors.append(f"{captions} not found")
    else:
        with open(captions, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                error, key = _check_xm3600_line(line)
                if error:
                    report.errors.append(f"{captions}:{number}: {error}")
                elif key in keys:
                    report.errors.append(f"{captions}:{number}: image/key {key} already on line {keys[key]}")
                else:
                    keys[key] = number
    report.caption_entries = len(keys)
    report.missing_images = sorted(k for k in keys if k not in on_disk)
    report.extra_files = sorted(on_disk[stem] for stem in on_disk if stem not in keys)
    if images.is_dir():
        report.extra_files += sorted(p.name for p in images.iterdir() if p.suffix != ".jpg")
    return report


def _check_xm3600_line(line: str) -> tuple[str | None, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})", ""
    key = row.get("image/key") if isinstance(row, dict) else None
    if not isinstance(key, str) or not _KEY_RE.match(key):
        return "expected a JSON object whose \"image/key\" is 16 lowercase hex digits", ""
    return None, key


def verify_xtd10(root: str | os.PathLike) -> VerifyReport:
    """Check ``<root>/xtd10``: the name list, a line-aligned caption file per language, the images."""
    folder = _benchmark_folder(Path(root), "xtd10", "test_image_names.txt")
    report = VerifyReport("xtd10", folder, XTD10_IMAGES)
    names_file = folder / "test_image_names.txt"
    if not names_file.is_file():
        report.errors.append(f"{names_file} not found")
        return report
    names = [n.strip() for n in names_file.read_text(encoding="utf-8-sig").split("\n") if n.strip()]
    report.caption_entries = len(names)
    for lang in XTD10_LANGUAGES:
        path = folder / f"test_1kcaptions_{lang}.txt"
        if not path.is_file():
            report.errors.append(f"{path} not found")
            continue
        lines = path.read_text(encoding="utf-8-sig").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != len(names):
            report.errors.append(f"{path}: {len(lines)} lines for {len(names)} images")
    images = next((folder / d for d in ("images", "train2014") if (folder / d).is_dir()), folder / "images")
    report.missing_images = [n for n in names if not (images / n).is_file()]
    report.found_images = len(names) - len(report.missing_images)
    if report.missing_images:
        report.notes.append(
            f"XTD10 images are COCO train2014 files that mlilt cannot download: copy the "
            f"{len(report.missing_images)} missing files named in {names_file} (from the train2014 "
            f"folder of {COCO_TRAIN2014}) into {images}/")
    return report


# --------------------------------------------------------------------------- download + unpack


def _fetch_all(benchmark: str, root: Path, progress: Progress | None,
               names: Iterable[str] | None = None) -> tuple[dict[str, Path], list[str]]:
    """Fetch the sources of ``benchmark`` into ``<root>/.downloads/<benchmark>/`` (finished
    files are not fetched again); returns (name -> path of what is there, "url: why" failures)."""
    folder = root / ".downloads" / benchmark
    got, failed = {}, []
    for name, url in SOURCES[benchmark].items():
        if names is not None and name not in names:
            continue
        dest = folder / name
        if not dest.is_file():
            report = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
            try:
                fetch(url, dest, report)
            except MliltError as exc:
                failed.append(f"{url}: {exc}")
                continue
        got[name] = dest
    return got, failed


def download_xm3600(root: str | os.PathLike, progress: Progress | None = None,
                    overwrite: bool = False) -> VerifyReport:
    """Fetch, unpack and verify Crossmodal-3600 under ``root``.

    ``progress(label, done, total)`` reports each file's bytes. What could not be fetched is in
    the report's ``not_fetched`` (and ``ok`` is then False); run again to resume.
    """
    root = Path(root)
    target = root / "xm3600"
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; use --overwrite to download and replace it")
    got, failed = _fetch_all("xm3600", root, progress)
    if failed:
        report = verify_xm3600(root) if target.exists() else VerifyReport("xm3600", target, XM3600_IMAGES)
        report.not_fetched = failed
        report.notes.append(f"nothing was unpacked; run again to resume the downloads in {root / '.downloads'}")
        return report
    return unpack_xm3600(got["captions.zip"], got["images.tgz"], root, overwrite=overwrite)


def download_xtd10(root: str | os.PathLike, progress: Progress | None = None) -> VerifyReport:
    """Fetch the XTD10 caption files into ``<root>/xtd10/`` and verify; images are the user's.

    Files already in ``<root>/xtd10`` (the images the user copied) are left alone; the caption
    files are (re)written atomically from the downloads.
    """
    root = Path(root)
    target = root / "xtd10"
    got, failed = _fetch_all("xtd10", root, progress)
    for name, path in got.items():
        write_bytes(target / name, path.read_bytes())
    if not (target / "train2014").is_dir():
        (target / "images").mkdir(parents=True, exist_ok=True)  # where the user puts the COCO images
    report = verify_xtd10(root) if (target / "test_image_names.txt").is_file() else \
        VerifyReport("xtd10", target, XTD10_IMAGES)
    report.not_fetched = failed
    return report
