"""Download and unpack helpers shared by the benchmark modules.

Downloads resume: a partial file ``<name>.part`` is continued with an HTTP ``Range`` request
the next time, and is renamed to ``<name>`` only when complete. Archives are unpacked without
trusting their member names: tar members go through :func:`tarfile.data_filter` (no absolute
or escaping paths, no links leaving the target, no device files), and nothing is ever written
outside the target folder.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from mlilt.errors import DataError, MliltError

_CHUNK = 1 << 20

Progress = Callable[[str, int, "int | None"], None]  # (label, bytes done, total bytes or None)


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
                _copy_body(response, part, start, total, progress)
            except (OSError, http.client.HTTPException) as exc:
                raise MliltError(f"downloading {url} was interrupted ({exc}); {retry}") from None
        size = part.stat().st_size
        if total is not None and size != total:
            raise MliltError(f"downloading {url} stopped at {size} of {total} bytes; {retry}")
        os.replace(part, dest)
        return dest
    raise AssertionError("unreachable")


def _copy_body(response, part: Path, start: int, total: int | None,
               progress: Callable[[int, int | None], None] | None) -> None:
    """Write the response body into ``part`` from byte ``start`` on, reporting progress."""
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


def fetch_sources(sources: dict[str, str], folder: Path, progress: Progress | None = None
                  ) -> tuple[dict[str, Path], list[str]]:
    """Fetch ``sources`` (file name -> url) into ``folder``; finished files are not fetched again.

    Returns (name -> path of what is there, "url: why" for each failure); one failure does not
    stop the others.
    """
    got, failed = {}, []
    for name, url in sources.items():
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


# --------------------------------------------------------------------------- unpacking


def _flat_name(name: str) -> str:
    """The file name without its folders; hidden (``.``, ``._``) files and ``..`` give ''."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return "" if not base or base.startswith(".") else base


def extract_flat(archive_path: Path, dest: Path, suffix: str) -> int:
    """Extract every regular ``*<suffix>`` member of a tar archive into ``dest``, without its
    folders; returns how many. DataError for an unreadable archive or a refused member."""
    if not hasattr(tarfile, "data_filter"):
        raise MliltError("unpacking needs a Python with tarfile extraction filters (3.10.12+, 3.11.4+)")
    taken: set[str] = set()

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        checked = tarfile.data_filter(member, path)
        if checked.name != member.name:  # data_filter makes absolute names relative; refuse them
            raise DataError(f"{archive_path}: refusing member {member.name!r}: absolute path")
        name = _flat_name(member.name)
        # Links, even ones data_filter lets through, would point elsewhere once flattened.
        if not checked.isfile() or not name.lower().endswith(suffix):
            return None
        if name in taken:
            raise DataError(f"{archive_path}: two members flatten to the same file {name!r}")
        taken.add(name)
        return checked.replace(name=name, deep=False)

    try:
        with tarfile.open(archive_path, mode="r|*") as archive:
            archive.extractall(dest, filter=keep)
    except tarfile.FilterError as exc:
        raise DataError(f"{archive_path}: refusing member {exc.tarinfo.name!r}: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive_path}: not a readable tar archive ({exc}); delete it and download again") from None
    return len(taken)


def extract_zip_member(archive_path: Path, file_name: str, dest: Path) -> None:
    """Copy the one member called ``file_name`` (in whatever folder) of a zip archive to ``dest``."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{archive_path}: not a readable zip archive ({exc}); delete it and download again") from None
    found = None
    with archive:
        for info in archive.infolist():
            _check_zip_member(info, archive_path)
            if info.is_dir() or _flat_name(info.filename) != file_name:
                continue
            if found is not None:
                raise DataError(f"{archive_path}: holds {file_name} twice ({found!r}, {info.filename!r})")
            found = info.filename
            with archive.open(info) as source, open(dest, "wb") as target:
                shutil.copyfileobj(source, target, _CHUNK)
    if found is None:
        raise DataError(f"{archive_path}: no {file_name} inside")


def _check_zip_member(info: zipfile.ZipInfo, archive_path: Path) -> None:
    """Refuse members no honest archive holds: zipfile has no extraction filter like tarfile's.

    The member's bytes go to a path chosen here, so its name never reaches the file system;
    but an absolute or ``..`` name marks a hostile or broken archive, and a symlink entry's
    bytes are a link target, not the file it claims to be.
    """
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{archive_path}: refusing member {name!r}: absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DataError(f"{archive_path}: refusing member {name!r}: '..' in path")
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no Unix type
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):  # links, devices, fifos
        raise DataError(f"{archive_path}: refusing member {name!r}: not a regular file")
