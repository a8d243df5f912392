"""Image-caption pairs from WebDataset tar shards, read lazily: memory does not grow with the images.

``read_pairs`` hands a source here when it names shards the way open_clip's ``--train-data``
does: a ``.tar`` file, a brace pattern (``shards/{000000..000099}.tar``), a ``::``-separated
list of either, local paths or ``http(s)://`` URLs.

Conventions are WebDataset's (``webdataset.tariterators``): a member's *key* is its name up to
the first dot of its base name and its *suffix* the rest, lower-cased (``dir/000123.jpg`` ->
``dir/000123`` + ``jpg``); consecutive members with one key make one sample; ``__*__`` members
and anything that is not a regular file are ignored. A sample's image is its first ``jpg``,
``jpeg``, ``png`` or ``webp`` member (``image_column`` names others, ``;``-separated, as
open_clip's ``rename`` does); its caption the ``txt`` member, else the ``caption``/``text``/
``sentences``/``captions`` field of its ``json`` member (``caption_column`` names a member
suffix or a json field); its language the ``lang`` field of the json (or ``lang_column``).

Why the standard library's ``tarfile`` and not ``webdataset``'s own reader: that reader streams
every member's bytes, and a pair set holds one reference per image for the whole run. Here an
image is a :class:`TarMember` (shard, offset, size) whose bytes are read when the image is
checked, hashed or decoded, and never kept; only captions and these references stay in memory.
Such a read needs an uncompressed, seekable tar, so ``.tar.gz`` shards are refused with a hint.

A URL is downloaded once into ``<mlilt cache>/shards/`` under a temporary name and renamed
into place only when complete (a cut-off download never counts as a shard); with
offline mode on (``HF_HUB_OFFLINE=1``, or ``HF_DATASETS_OFFLINE``, which wins when set, as in
``datasets``) nothing is downloaded and a URL not cached yet is an error.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlilt.data.images import ImageRef
from mlilt.data.pairs import CAPTION_FIELDS, LANG_FIELDS, _RowError
from mlilt.errors import DataError, UsageError
from mlilt.files.paths import cache_dir

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # open_clip: rename(image="jpg;png;jpeg;webp")
CAPTION_SUFFIXES = ("txt",)
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before a download is given up
_TEXT_LIMIT = 1 << 20  # a caption or json member larger than this is not a caption
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_STALE_PARTIAL = 24 * 3600.0  # seconds after which a left-over partial download is removed


# --------------------------------------------------------------------------- what a source names


def is_shard_source(label: str) -> bool:
    """Whether ``read_pairs`` should read ``label`` as shards: a ``::`` list, a URL, a brace
    pattern that is not an existing path, or a name ending in ``.tar`` (or a compressed tar)."""
    if "::" in label or _URL.match(label):
        return True
    if "{" in label and "}" in label and not os.path.exists(os.path.expanduser(label)):
        return True
    return _shard_suffix(label) is not None


def _shard_suffix(name: str) -> str | None:
    lowered = urllib.parse.urlsplit(name).path.lower() if _URL.match(name) else name.lower()
    return next((s for s in (".tar", *COMPRESSED) if lowered.endswith(s)), None)


def expand(label: str) -> list[str]:
    """The shards ``label`` names, in order: each ``::`` entry brace-expanded (braceexpand)."""
    from braceexpand import UnbalancedBracesError, braceexpand

    shards: list[str] = []
    for entry in label.split("::"):
        entry = entry.strip()
        if not entry:
            raise UsageError(f"{label}: empty entry in the '::'-separated list of shards")
        try:
            shards.extend(braceexpand(entry))
        except UnbalancedBracesError as exc:
            raise UsageError(f"{label}: bad brace pattern {entry!r} ({exc})") from None
    if not shards:
        raise DataError(f"{label}: the pattern expands to no shards")
    for shard in shards:
        suffix = _shard_suffix(shard)
        if suffix in COMPRESSED:
            raise UsageError(f"{shard}: compressed shards ({suffix}) cannot be read member by member; "
                             "decompress them to .tar (e.g. gunzip) and point at those")
        if suffix is None:
            raise UsageError(f"{shard} (from {label}): brace patterns, '::' lists and URLs name WebDataset "
                             ".tar shards; this is not a .tar")
        if _URL.match(shard) and not shard.lower().startswith(("http://", "https://")):
            raise UsageError(f"{shard}: only http:// and https:// shard URLs are supported")
    return shards


# --------------------------------------------------------------------------- lazy members


class Shard:
    """One local tar file, as it was when it was indexed: a read checks it is still that file."""

    __slots__ = ("path", "label", "stat")

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self.stat = _stat_key(os.stat(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shard) and (self.path, self.stat) == (other.path, other.stat)

    def __hash__(self) -> int:
        return hash((self.path, self.stat))

    def __repr__(self) -> str:
        return f"Shard({self.label!r})"

    def read(self, offset: int, size: int, member: str) -> bytes:
        where = f"{self.label}:{member}"
        try:
            with open(self.path, "rb") as handle:
                if _stat_key(os.fstat(handle.fileno())) != self.stat:
                    raise DataError(f"{where}: the shard changed since the data was read; read it again")
                handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            raise DataError(f"{where}: cannot read the shard {self.path} ({exc.strerror or exc})") from None
        if len(data) != size:
            raise DataError(f"{where}: the shard ends inside this member (truncated file)")
        return data


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class TarMember:
    """An image stored in a shard: read on demand, never kept (a :class:`~mlilt.data.images.StoredImage`)."""

    __slots__ = ("shard", "member", "offset", "size")

    def __init__(self, shard: Shard, member: str, offset: int, size: int):
        self.shard, self.member, self.offset, self.size = shard, member, offset, size

    def read(self) -> bytes:
        return self.shard.read(self.offset, self.size, self.member)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TarMember) and (self.shard, self.offset) == (other.shard, other.offset)

    def __hash__(self) -> int:
        return hash((self.shard, self.offset))

    def __repr__(self) -> str:
        return f"TarMember({self.shard.label!r}, {self.member!r})"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int
    text: bytes | None  # the bytes of a small member the record needs (caption, json), else None


def shard_records(label: str, columns) -> Iterator[tuple[str, Any, None]]:
    """(where, record or _RowError, None) per sample of every shard, in shard order then tar order.

    Every shard is located (and every URL downloaded) before the first record, so a missing
    shard is reported before any work is done.
    """
    specs = expand(label)
    shards = locate(specs, label)
    for shard in shards:
        yield from _records(shard, columns)


def locate(specs: list[str], label: str) -> list[Shard]:
    """A :class:`Shard` per spec: local files checked, URLs fetched into the cache."""
    missing = [spec for spec in specs if not _URL.match(spec) and not _expand(spec).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        where = f" ({len(missing)} of the {len(specs)} shards of {label})" if len(specs) > 1 else ""
        raise DataError(f"no such shard: {shown}{where}")
    located = []
    for spec in specs:
        path = fetch(spec) if _URL.match(spec) else Path(os.path.abspath(_expand(spec)))
        located.append(Shard(path, spec))
    return located


def _expand(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def _records(shard: Shard, columns) -> Iterator[tuple[str, Any, None]]:
    wanted = _text_suffixes(columns)
    for key, members, problem in _samples(shard, wanted):
        where = f"{shard.label}:{key}"
        yield where, problem or _record(shard, key, members, columns), None


def _suffixes(explicit: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.strip().lower() for s in explicit.split(";") if s.strip()) if explicit else defaults


def _text_suffixes(columns) -> set[str]:
    """Members whose bytes the record needs (read while indexing; everything else is only located)."""
    return {"json", *_suffixes(columns.caption, CAPTION_SUFFIXES), *_suffixes(columns.lang, ())}


def _samples(shard: Shard, wanted: set[str]) -> Iterator[tuple[str, dict[str, _Member], _RowError | None]]:
    """(key, suffix -> member, problem) per sample, grouped as webdataset's group_by_keys does."""
    key, members, problem = None, {}, None
    for name, suffix, info, text in _members(shard, wanted):
        if key is None or _KEY.match(name).group(1) != key:
            if key is not None:
                yield key, members, problem
            key, members, problem = _KEY.match(name).group(1), {}, None
        if suffix in members:
            problem = problem or _RowError("duplicate_member", f"two members with suffix .{suffix} "
                                                               f"({members[suffix].name}, {name})")
            continue
        members[suffix] = _Member(name, info.offset_data, info.size, text)
    if key is not None:
        yield key, members, problem


def _members(shard: Shard, wanted: set[str]) -> Iterator[tuple[str, str, tarfile.TarInfo, bytes | None]]:
    """Regular members with a key, with the bytes of the ``wanted`` (small text) ones; headers
    only are read for the rest (tarfile seeks over their data)."""
    try:
        with open(shard.path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            end = os.fstat(handle.fileno()).st_size
            while True:
                info = tar.next()
                if info is None:
                    return
                tar.members = []  # tarfile keeps every header it has read; a shard may have millions
                match = _KEY.match(info.name)
                if not info.isreg() or _META.match(info.name) or match is None:
                    continue
                if info.offset_data + info.size > end:
                    raise DataError(f"{shard.label}:{info.name}: the shard ends inside this member "
                                    "(truncated file; a download cut short?)")
                suffix = match.group(2).lower()
                text = None
                if suffix in wanted and info.size <= _TEXT_LIMIT:
                    text = tar.extractfile(info).read()
                yield info.name, suffix, info, text
    except tarfile.ReadError as exc:
        raise DataError(f"{shard.label}: not an uncompressed tar file, or a damaged one ({exc})") from None
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(f"{shard.label}: cannot read the shard ({exc})") from None


def _record(shard: Shard, key: str, members: dict[str, _Member], columns) -> dict | _RowError:
    """The sample as a record with the canonical field names ``read_pairs`` checks."""
    found = ", ".join(f".{suffix}" for suffix in members)
    try:
        meta = _json(members.get("json"))
        image_suffixes = _suffixes(columns.image, IMAGE_SUFFIXES)
        image = next((members[s] for s in image_suffixes if s in members), None)
        caption_fields = (columns.caption,) if columns.caption else CAPTION_FIELDS
        caption = _field(members, meta, _suffixes(columns.caption, CAPTION_SUFFIXES), caption_fields)
        lang = _field(members, meta, _suffixes(columns.lang, ()), (columns.lang,) if columns.lang else LANG_FIELDS)
    except _RowError as problem:
        return problem
    if image is None:
        what = "neither an image nor a caption" if caption is None else "a caption but no image"
        return _RowError("missing_image", f"sample {key} has {what} (images: "
                                          f"{', '.join('.' + s for s in image_suffixes)}; found: {found})")
    if caption is None:
        fields = ", ".join(caption_fields)
        suffixes = ", ".join("." + s for s in _suffixes(columns.caption, CAPTION_SUFFIXES))
        return _RowError("missing_caption", f"sample {key} has an image ({image.name}) but no caption "
                                            f"(no {suffixes} member and no {fields} field in a .json; "
                                            f"found: {found})")
    ref = ImageRef.from_stored(TarMember(shard, image.name, image.offset, image.size),
                               name=f"{shard.label}:{image.name}")
    record = {(columns.image or "image"): ref, (columns.caption or "caption"): caption}
    if lang is not None:
        record[columns.lang or "lang"] = lang
    return record


def _json(member: _Member | None) -> dict:
    if member is None:
        return {}
    if member.text is None:
        raise _RowError("malformed_json", f"{member.name}: {member.size:,} bytes is too large for a json member")
    try:
        value = json.loads(_text(member))
    except (ValueError, RecursionError) as exc:
        raise _RowError("malformed_json", f"{member.name}: malformed JSON ({exc})"[:300]) from None
    if not isinstance(value, dict):
        raise _RowError("not_object", f"{member.name}: expected a JSON object, got {type(value).__name__}")
    return value


def _text(member: _Member) -> str:
    if member.text is None:
        raise _RowError("bad_caption", f"{member.name}: {member.size:,} bytes is too large for a caption")
    try:
        return member.text.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise _RowError("bad_encoding", f"{member.name}: not valid UTF-8 (byte {exc.start + 1})") from None


def _field(members: dict[str, _Member], meta: dict, suffixes: tuple[str, ...], fields: tuple[str, ...]) -> Any:
    """A member's text, else a json field; None when neither is there."""
    for suffix in suffixes:
        if suffix in members and suffix != "json":
            return _text(members[suffix])
    return next((meta[name] for name in fields if name in meta), None)


# --------------------------------------------------------------------------- URLs


def offline_reason() -> str | None:
    """Which variable switches downloads off, or None. As in ``datasets.config``: a set
    ``HF_DATASETS_OFFLINE`` decides, else ``HF_HUB_OFFLINE``."""
    name = next((n for n in OFFLINE_VARIABLES[::-1] if os.environ.get(n) is not None), None)
    if name and os.environ[name].strip().upper() in ("1", "ON", "YES", "TRUE"):
        return f"{name}={os.environ[name]}"
    return None


def cached_path(url: str, root: Path | None = None) -> Path:
    """Where ``url``'s shard lives once downloaded: a folder per URL, the URL's file name."""
    name = Path(urllib.parse.urlsplit(url).path).name or "shard.tar"
    return (root or cache_dir() / "shards") / hashlib.sha256(url.encode("utf-8")).hexdigest()[:24] / name


def fetch(url: str, root: Path | None = None) -> Path:
    """The local copy of a shard URL, downloaded first if it is not in the cache yet."""
    dest = cached_path(url, root)
    if dest.is_file():
        return dest
    reason = offline_reason()
    if reason:
        raise DataError(f"{url}: this shard is not downloaded yet and downloads are off ({reason}); run once "
                        f"with network access, or download it and give its local path (cache: {dest})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    partial = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.partial"
    try:
        _download(url, partial)
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return dest


def _download(url: str, partial: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(partial, "xb") as out:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: download failed (HTTP {exc.code} {exc.reason}); nothing was cached") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"{url}: download failed ({reason}); nothing was cached") from None
    if expected is not None and expected.isdigit() and size != int(expected):
        raise DataError(f"{url}: download cut short ({size:,} of {int(expected):,} bytes); nothing was cached")
    try:
        with tarfile.open(partial, mode="r:") as tar:
            tar.next()
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{url}: the download is not an uncompressed tar file ({exc}); nothing was cached") from None


def _remove_stale_partials(dest: Path) -> None:
    """Partial downloads a killed process left behind (a live one's stays: it may be in use)."""
    now = time.time()
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > _STALE_PARTIAL:
                stale.unlink()
