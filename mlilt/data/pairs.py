"""Read image-caption pairs from JSON Lines, CSV/TSV, a Hugging Face dataset or WebDataset shards.

Every format goes through the same per-row checks (:class:`_Collector`), so a bad row gets
the same message and the same ``skip_bad`` reason whatever file it came from. Messages name
the file and the 1-based line (JSONL, CSV) or the 0-based row index (datasets), because a
user fixing a 100k-line file needs to jump straight to the offending line.

Decisions worth knowing:

* A caption may be a string or a list of strings (the ``sentences`` column of COCO-style
  datasets); every caption in a list becomes its own pair with the same image, so
  :meth:`PairSet.split` keeps them on one side.
* ``lang`` keeps rows whose language equals it (case-insensitive) and rows without one
  (the file is taken to be in that language, and the pair gets ``lang``).
* Rows are validated before the language filter (a broken line is broken whatever its
  language), but image files are only checked for the rows that are kept.
* Image files must exist even with ``check_images=False``; that flag only skips decoding.
* Images embedded in a dataset or a shard are not copied into memory: each ref reads its
  bytes on demand from the memory-mapped Arrow table (:class:`_DatasetCell`) or the tar
  member (:mod:`mlilt.data.shards`), so a pair set costs its captions and refs only.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from mlilt.data.images import ImageRef, image_id, verify_image
from mlilt.errors import DataError, MliltError, UsageError

IMAGE_FIELDS = ("image", "image_path", "file", "filepath")
CAPTION_FIELDS = ("caption", "text", "sentences", "captions")
LANG_FIELDS = ("lang",)

ROW_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
DATASET_FILES = {".parquet": "parquet", ".arrow": "arrow"}
SUPPORTED = (
    ".jsonl/.json (JSON Lines), .csv, .tsv, .parquet, .arrow, a folder of parquet/arrow "
    "files, a datasets save_to_disk folder (optionally FOLDER:split), a Hugging Face "
    "dataset name user/name[:split], or WebDataset .tar shards (a brace pattern, '::' lists, URLs)"
)
UNDETERMINED = "und"  # BCP-47 "undetermined": the summary key for rows without a language
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One training example; ``source`` ("file.jsonl:12") is where to look when it is wrong."""

    image: ImageRef
    caption: str
    lang: str | None
    source: str


@dataclass
class PairSet:
    """The pairs read from one source, and what was skipped on the way (reason -> rows)."""

    pairs: list[Pair]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def summary(self) -> dict:
        """Counts and a content hash for pack metadata: which data made this pack.

        The hash covers, in order, each pair's image content hash, caption and language, so
        renaming image files leaves it unchanged while editing a caption or a pixel does not.
        """
        digest = hashlib.sha256()
        seen: set[tuple[str, str]] = set()
        duplicates = 0
        for pair in self.pairs:
            key = (image_id(pair.image, pair.source), pair.caption)
            duplicates += key in seen
            seen.add(key)
            digest.update("\0".join((*key, pair.lang or "")).encode("utf-8") + b"\n")
        langs = Counter(pair.lang or UNDETERMINED for pair in self.pairs)
        return {
            "source": self.source,
            "rows": len(self.pairs),
            "images": len({image for image, _ in seen}),
            "langs": dict(langs.most_common()),
            "skipped": dict(self.skipped),
            "duplicates": duplicates,
            "sha256": digest.hexdigest(),
        }

    def split(self, holdout: float | int, seed: int) -> tuple["PairSet", "PairSet"]:
        """Deterministic (train, held-out) split by image content.

        ``holdout`` is a fraction of the images (float, 0 < h < 1) or a number of images
        (int). Each image is ranked by sha256(seed, image id), so an image's side does not
        depend on file order or on which other images are present, and all captions of an
        image (and every copy of the same picture) land on the same side.
        """
        _check_seed(seed)
        groups: dict[str, list[int]] = {}
        for index, pair in enumerate(self.pairs):
            groups.setdefault(image_id(pair.image, pair.source), []).append(index)
        count = _holdout_count(holdout, len(groups))
        ranked = sorted(groups, key=lambda ident: hashlib.sha256(f"{seed}\0{ident}".encode()).digest())
        held = {index for ident in ranked[:count] for index in groups[ident]}
        tag = f"holdout={holdout}, seed={seed}"
        train = [pair for index, pair in enumerate(self.pairs) if index not in held]
        test = [pair for index, pair in enumerate(self.pairs) if index in held]
        return (
            PairSet(train, f"{self.source} (train part, {tag})", dict(self.skipped)),
            PairSet(test, f"{self.source} (held-out part, {tag})", dict(self.skipped)),
        )


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")


def _holdout_count(holdout: Any, images: int) -> int:
    """How many images to hold out; both sides must end up non-empty."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise UsageError(f"holdout must be a fraction (0 < h < 1) or a number of images, got {holdout!r}")
    if images < 2:
        raise UsageError(f"cannot split {images} image(s) into two non-empty parts")
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise UsageError(f"holdout fraction must be between 0 and 1 (exclusive), got {holdout}")
        return min(images - 1, max(1, round(holdout * images)))
    if not 1 <= holdout < images:
        raise UsageError(f"holdout must be between 1 and {images - 1} images here, got {holdout}")
    return holdout


# --------------------------------------------------------------------------- entry point


def read_pairs(
    source: str | os.PathLike,
    lang: str | None = None,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    image_column: str | None = None,
    caption_column: str | None = None,
    lang_column: str | None = None,
) -> PairSet:
    """Read image-caption pairs; see the module docstring for the formats and the rules.

    Bad rows raise :class:`DataError` naming file and line, unless ``skip_bad``, which
    skips them and counts them by reason in :attr:`PairSet.skipped`. A source left with
    no valid row is an error either way.
    """
    for name, value in (("lang", lang), ("image_column", image_column),
                        ("caption_column", caption_column), ("lang_column", lang_column)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"{name} must be a non-empty string, got {value!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"source must be a path or a dataset name, got {type(source).__name__}")
    columns = _Columns(image_column, caption_column, lang_column)
    label = str(os.fspath(source))
    collector = _Collector(label, lang.strip() if lang else None, skip_bad, check_images)
    for where, record, base in _records(label, columns):
        collector.add(where, record, base, columns)
    return collector.finish()


@dataclass(frozen=True)
class _Columns:
    """Field names chosen by the caller; ``None`` means "use the usual aliases"."""

    image: str | None
    caption: str | None
    lang: str | None

    def candidates(self, what: str) -> tuple[str, ...]:
        explicit = getattr(self, what)
        defaults = {"image": IMAGE_FIELDS, "caption": CAPTION_FIELDS, "lang": LANG_FIELDS}
        return (explicit,) if explicit else defaults[what]


def _records(label: str, columns: _Columns) -> Iterator[tuple[str, Any, Path | None]]:
    """Yield (where, record-or-_RowError, base folder for relative image paths)."""
    path = _expand(label)
    from mlilt.data import shards  # it imports this module

    if not path.is_dir() and shards.is_shard_source(label):
        return shards.shard_records(label, columns)
    if path.is_file():
        kind = ROW_FORMATS.get(path.suffix.lower())
        if kind == "jsonl":
            return _with_base(_jsonl_records(path, label), path.parent)
        if kind in ("csv", "tsv"):
            delimiter = "\t" if kind == "tsv" else ","
            return _with_base(_csv_records(path, label, delimiter, columns), path.parent)
        if path.suffix.lower() in DATASET_FILES:
            return _dataset_records(_load_dataset_file(path, label), label, path.parent, columns)
        suffix = path.suffix or "(no extension)"
        raise UsageError(f"unsupported format {suffix!r} for {label}; supported: {SUPPORTED}")
    opened = _open_dataset(label)
    if opened is None:
        raise DataError(f"{label}: no such file or folder")
    dataset, base = opened
    return _dataset_records(dataset, label, base, columns)


def _open_dataset(label: str, hub: bool = True):
    """(dataset, folder relative paths resolve against) for a folder, ``FOLDER:split`` or, with
    ``hub``, a Hub dataset name; None when ``label`` is none of them."""
    path = _expand(label)
    if path.is_dir():
        return _load_dataset_folder(path, None, label), path
    folder, _, split = label.rpartition(":")
    if folder and split and _expand(folder).is_dir():
        return _load_dataset_folder(_expand(folder), split, label), _expand(folder)
    if hub and _looks_like_hub_name(label):
        return _load_hub(label), None
    return None


def _expand(text: str) -> Path:
    """``~/x`` -> home; ``~unknown`` (no such user) stays as written instead of raising."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def _with_base(records: Iterable[tuple[str, Any]], base: Path) -> Iterator[tuple[str, Any, Path]]:
    for where, record in records:
        yield where, record, base


def _looks_like_hub_name(label: str) -> bool:
    suffix = Path(label.split(":")[0]).suffix.lower()
    return bool(_HUB_NAME.match(label)) and suffix not in ROW_FORMATS and suffix not in DATASET_FILES


# --------------------------------------------------------------------------- row checks


class _RowError(Exception):
    """A problem with one row: fatal, or counted under ``reason`` with ``skip_bad``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class _Collector:
    """Turns records into pairs, applying the checks and rules shared by every format."""

    def __init__(self, label: str, lang: str | None, skip_bad: bool, check_images: bool):
        self.label, self.lang, self.skip_bad, self.check_images = label, lang, skip_bad, check_images
        self.pairs: list[Pair] = []
        self.skipped: Counter[str] = Counter()
        self.langs_seen: Counter[str] = Counter()
        self.rows_in_lang = 0  # rows that passed the language filter, valid or not
        self.first_problem: str | None = None
        # ref -> (the first equal ref, its problem or None): each image is checked once, and the
        # pairs of one image share one ref, so its content hash is computed once.
        self.images: dict[ImageRef, tuple[ImageRef, _RowError | None]] = {}

    def add(self, where: str, record: Any, base: Path | None, columns: _Columns) -> None:
        try:
            if isinstance(record, _RowError):
                raise record
            value, captions, row_lang = _extract(record, columns)
            self.langs_seen[row_lang or UNDETERMINED] += 1
            if self.lang and row_lang and row_lang.casefold() != self.lang.casefold():
                return
            self.rows_in_lang += 1
            ref = self._checked_image(_image_ref(value, base, where))
        except _RowError as problem:
            self._bad(where, problem)
            return
        for caption in captions:
            self.pairs.append(Pair(ref, caption, row_lang or self.lang, where))

    def _bad(self, where: str, problem: _RowError) -> None:
        message = f"{where}: {problem.message}"
        if not self.skip_bad:
            raise DataError(message)
        self.skipped[problem.reason] += 1
        self.first_problem = self.first_problem or message

    def _checked_image(self, ref: ImageRef) -> ImageRef:
        """The first ref equal to ``ref``, or _RowError if that image is not usable."""
        if ref not in self.images:
            self.images[ref] = (ref, _image_problem(ref, self.check_images))
        first, problem = self.images[ref]
        if problem is not None:  # a fresh exception: re-raising one object grows its traceback
            raise _RowError(problem.reason, problem.message)
        return first

    def finish(self) -> PairSet:
        if self.pairs:
            return PairSet(self.pairs, self.label, dict(self.skipped.most_common()))
        skipped = ", ".join(f"{reason} {n}" for reason, n in self.skipped.most_common())
        if self.lang and self.langs_seen and not self.rows_in_lang:
            present = ", ".join(f"{code} {n}" for code, n in self.langs_seen.most_common())
            extra = f"; skipped as bad: {skipped}" if skipped else ""
            raise DataError(
                f"no rows for --lang {self.lang} in {self.label} (languages present: {present}{extra})"
            )
        if self.skipped:
            raise DataError(
                f"no valid rows in {self.label} (skipped: {skipped}); first problem: {self.first_problem}"
            )
        raise DataError(f"{self.label}: no rows (the file has no data)")


def _pick(record: dict, candidates: tuple[str, ...], what: str, required: bool = True) -> Any:
    for name in candidates:
        if name in record:
            return record[name]
    if not required:
        return None
    found = ", ".join(map(str, record)) or "none"
    raise _RowError(
        "missing_field",
        f"missing {what} field (expected one of: {', '.join(candidates)}; found: {found})",
    )


def _extract(record: dict, columns: _Columns) -> tuple[Any, list[str], str | None]:
    """The raw image value, the normalised captions and the language of one record."""
    value = _pick(record, columns.candidates("image"), "image")
    captions = _captions(_pick(record, columns.candidates("caption"), "caption"))
    row_lang = _pick(record, columns.candidates("lang"), "lang", required=False)
    if row_lang is not None and not isinstance(row_lang, str):
        raise _RowError("bad_lang", f"lang must be a string, got {_kind(row_lang)}")
    row_lang = row_lang.strip() if row_lang else None
    _check_text(row_lang or "", "lang")
    return value, captions, row_lang or None


def _captions(value: Any) -> list[str]:
    """Strings are taken as one caption, lists of strings as several; whitespace collapsed."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _RowError("empty_caption", "caption list is empty")
    captions = []
    for item in items:
        if not isinstance(item, str):
            message = f"caption must be a string (or a list of strings), got {_kind(item)}"
            raise _RowError("bad_caption", message)
        caption = " ".join(item.split())
        if not caption:
            raise _RowError("empty_caption", "caption is empty or only whitespace")
        _check_text(caption, "caption")
        captions.append(caption)
    return captions


def _check_text(text: str, what: str) -> None:
    """Reject lone surrogates (JSON "\\ud800", undecodable CSV bytes): they cannot be hashed or tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        reason = "bad_encoding" if "\udc80" <= text[exc.start] <= "\udcff" else "bad_caption"
        raise _RowError(reason, f"{what} is not valid UTF-8 text (at character {exc.start + 1})") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _image_ref(value: Any, base: Path | None, where: str) -> ImageRef:
    """An ImageRef from a path string, an HF ``{"bytes", "path"}`` dict, bytes or a PIL image
    (or one a reader made itself: a shard member, a dataset cell)."""
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return ImageRef.from_bytes(value["bytes"], name=str(value.get("path") or "<embedded>"))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef.from_bytes(bytes(value), name="<embedded>")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a decoded PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return ImageRef.from_bytes(buffer.getvalue(), name="<embedded>")
    if not isinstance(value, str):
        raise _RowError("bad_image", f"image must be a path string, got {_kind(value)}")
    return ImageRef.from_path(_resolve(value, base))


def _resolve(text: str, base: Path | None) -> Path:
    text = text.strip()
    if not text:
        raise _RowError("missing_field", "image path is empty")
    if _URL.match(text):
        raise _RowError("missing_image", f"image is a URL ({text}); download the images and give local paths")
    _check_text(text, "image path")
    path = _expand(text)
    if not path.is_absolute() and base is not None:
        path = base / path
    return Path(os.path.abspath(path))


def _image_problem(ref: ImageRef, decode: bool) -> _RowError | None:
    """None if the image is usable, else the problem (its message lacks the row's location)."""
    if ref.path is not None:
        try:
            if ref.path.is_dir():
                return _RowError("missing_image", f"image path is a folder, not a file: {ref.path}")
            if not ref.path.is_file():
                return _RowError("missing_image", f"image file not found: {ref.path}")
        except (OSError, ValueError):
            return _RowError("missing_image", f"image file not found: {ref.path}")
    if not decode:
        return None
    try:
        verify_image(ref)
    except DataError as exc:
        return _RowError("unreadable_image", str(exc))
    return None


# --------------------------------------------------------------------------- JSON Lines


def _read_bytes(path: Path, label: str) -> bytes:
    """The file's bytes (decompressed when its name ends in ``.gz``), BOM removed; empty and
    UTF-16 files are refused up front."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOFError: cut short
            raise DataError(f"{label}: not a valid gzip file ({exc})") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{label}:1: file is UTF-16 encoded; save it as UTF-8")
    data = data.removeprefix(b"\xef\xbb\xbf")
    if not data.strip():
        raise DataError(f"{label}: file is empty")
    return data


def _lines(path: Path, label: str) -> Iterator[tuple[str, int, str | _RowError]]:
    """(where, line number, text) of each non-blank line; a line that is not UTF-8 is a _RowError.

    Blank lines are ignored (editors leave them at the end).
    """
    for number, raw in enumerate(_read_bytes(path, label).split(b"\n"), start=1):
        where = f"{label}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8"
            yield where, number, _RowError("bad_encoding", message)
            continue
        if text.strip():
            yield where, number, text


def _jsonl_records(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    """One JSON object per non-blank line."""
    for where, number, text in _lines(path, label):
        yield where, text if isinstance(text, _RowError) else _parse_json_line(text, number)


def _parse_json_line(text: str, number: int) -> Any:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return _RowError("malformed_json", f"malformed JSON at column {exc.colno}: {exc.msg}")
    except (ValueError, RecursionError) as exc:  # e.g. integers too long, nesting too deep
        return _RowError("malformed_json", f"malformed JSON ({type(exc).__name__}: {exc})"[:300])
    if isinstance(record, dict):
        return record
    hint = ""
    if isinstance(record, list) and number == 1:
        hint = "; JSON Lines needs one object per line, not one array"
    return _RowError("not_object", f"expected a JSON object, got {_kind(record)}{hint}")


# --------------------------------------------------------------------------- CSV / TSV


def _csv_records(path: Path, label: str, delimiter: str, columns: _Columns) -> Iterator[tuple[str, Any]]:
    """Rows as dicts keyed by the header; quoted fields may span lines (reported at their first)."""
    # Undecodable bytes become lone surrogates, so the row they sit in can be reported.
    text = _read_bytes(path, label).decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    previous_limit = csv.field_size_limit(2**31 - 1)  # long captions are kept, not refused
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                message = f"malformed {path.suffix[1:].upper()} ({exc})"
                yield f"{label}:{start}", _RowError("malformed_row", message)
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = _header(row, label, start, columns, delimiter)
                continue
            yield f"{label}:{start}", _csv_record(header, row)
    finally:
        csv.field_size_limit(previous_limit)


def _header(row: list[str], label: str, line: int, columns: _Columns, delimiter: str) -> list[str]:
    """Map the header's names onto the canonical ones; a header without them is fatal."""
    names = [cell.strip() for cell in row]
    lowered = {name.lower(): name for name in reversed(names)}
    renamed = list(names)
    for what in ("image", "caption", "lang"):
        candidates = columns.candidates(what)
        match = next((c for c in candidates if c in names), None)
        match = match or next((lowered[c.lower()] for c in candidates if c.lower() in lowered), None)
        if match is None and what != "lang":
            hint = " (is it tab-separated? name it .tsv)" if delimiter == "," and "\t" in row[0] else ""
            raise DataError(
                f"{label}:{line}: header has no {what} column (expected one of: "
                f"{', '.join(candidates)}; found: {', '.join(names)}){hint}"
            )
        if match is not None:
            renamed[names.index(match)] = candidates[0]
    return renamed


def _csv_record(header: list[str], row: list[str]) -> Any:
    if len(row) != len(header):
        message = f"{len(row)} fields but the header has {len(header)} (unquoted delimiter in a caption?)"
        return _RowError("malformed_row", message)
    record: dict[str, Any] = {}
    for name, cell in zip(header, row):
        record.setdefault(name, cell)
    return record


# --------------------------------------------------------------------------- datasets


def _datasets():
    import datasets  # deferred: importing it costs about a second

    return datasets


def _load_dataset_file(path: Path, label: str):
    kind = DATASET_FILES[path.suffix.lower()]
    return _guarded(label, lambda: _datasets().load_dataset(kind, data_files=[str(path)], split="train"))


def _load_dataset_folder(folder: Path, split: str | None, label: str):
    """A save_to_disk folder (Dataset or DatasetDict), else every parquet/arrow file below."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = _guarded(label, lambda: _datasets().load_from_disk(str(folder)))
        return _choose_split(loaded, split, label)
    if split:
        raise UsageError(f"{label}: a :split suffix needs a save_to_disk folder holding a DatasetDict")
    for suffix, kind in DATASET_FILES.items():
        files = sorted(str(p) for p in folder.rglob(f"*{suffix}") if p.is_file())
        if files:
            return _guarded(label, lambda: _datasets().load_dataset(kind, data_files=files, split="train"))
    raise DataError(f"{label}: folder holds no .parquet or .arrow files and is not a save_to_disk folder")


def _choose_split(loaded, split: str | None, label: str):
    if not hasattr(loaded, "keys"):  # a single Dataset
        if split:
            raise UsageError(f"{label}: this dataset has no splits; drop the :{split} suffix")
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        split = names[0]
    split = split or "train"
    if split not in loaded:
        raise UsageError(f"{label}: no split {split!r} (splits: {', '.join(names)}); add :SPLIT to choose")
    return loaded[split]


def _load_hub(label: str):
    name, _, split = label.partition(":")
    return _guarded(label, lambda: _datasets().load_dataset(name, split=split or "train"), hub=True)


def _guarded(label: str, load, hub: bool = False):
    """Run a datasets loader; its many exception types become one DataError naming the source."""
    try:
        return load()
    except MliltError:
        raise
    except Exception as exc:  # datasets raises OSError, ValueError, FileNotFoundError, ...
        what = "cannot be loaded as a dataset"
        if hub:
            what = "is not a file or folder, and loading it as a Hugging Face dataset failed"
        raise DataError(f"{label}: {what} ({type(exc).__name__}: {exc})"[:1000]) from None


def _dataset_records(
    dataset, label: str, base: Path | None, columns: _Columns
) -> Iterator[tuple[str, Any, Path | None]]:
    """Rows of a datasets.Dataset; images stay encoded (decoding waits for the tower) and where
    they are (an embedded image is a :class:`_DatasetCell`, read from the table when needed)."""
    datasets = _datasets()
    names = list(dataset.column_names)
    image = _dataset_column(dataset, names, columns, "image", label)
    caption = _dataset_column(dataset, names, columns, "caption", label)
    lang = _dataset_column(dataset, names, columns, "lang", label)
    if isinstance(dataset.features.get(image), datasets.Image):
        dataset = dataset.cast_column(image, datasets.Image(decode=False))
    wanted = [name for name in (image, caption, lang) if name]
    table = dataset.select_columns(wanted).with_format("arrow")
    cells = _DatasetColumn(dataset.select_columns([image]).with_format("arrow"), label)
    # Records use the first candidate name, which is what _extract looks for first.
    chosen = (("image", image), ("caption", caption), ("lang", lang))
    rename = {name: columns.candidates(what)[0] for what, name in chosen if name}
    index = 0
    for batch in table.iter(batch_size=_ROWS_PER_BATCH):
        values = {name: (_image_values(batch.column(name), cells, index) if name == image
                         else batch.column(name).to_pylist()) for name in wanted}
        for offset in range(batch.num_rows):
            row = {rename[name]: values[name][offset] for name in wanted}
            yield f"{label} row {index + offset}", row, base
        index += batch.num_rows


_ROWS_PER_BATCH = 1024


class _DatasetColumn:
    """The image column of one dataset read by ``read_pairs``, shared by all of its cells."""

    def __init__(self, view, label: str):
        self.view, self.label = view, label  # a one-column dataset formatted as Arrow tables


class _DatasetCell:
    """One embedded image of a dataset: its bytes are read from the (memory-mapped) Arrow table
    on demand, never copied into the pair set (a :class:`~mlilt.data.images.StoredImage`)."""

    __slots__ = ("column", "row")

    def __init__(self, column: _DatasetColumn, row: int):
        self.column, self.row = column, row

    def read(self) -> bytes:
        try:
            value = self.column.view[self.row].column(0)[0].as_py()
        except Exception as exc:  # pyarrow and datasets raise many kinds
            raise DataError(f"{self.column.label} row {self.row}: cannot read the image from the dataset "
                            f"({type(exc).__name__}: {exc})"[:500]) from None
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"{self.column.label} row {self.row}: the image's bytes are gone from the dataset")
        return bytes(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DatasetCell) and (self.column, self.row) == (other.column, other.row)

    def __hash__(self) -> int:
        return hash((id(self.column), self.row))

    def __repr__(self) -> str:
        return f"<{self.column.label} row {self.row}>"


def _image_values(column, cells: _DatasetColumn, start: int) -> list:
    """Per row of a batch: a ref to an embedded image (its bytes are not touched), else what the
    row holds (a path, an ``{"bytes": None, "path": ...}`` dict, a null) as before."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        embedded = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        paths = pc.struct_field(column, "path").to_pylist() if kind.get_field_index("path") >= 0 else None
        present = column.is_valid().to_pylist()
        return [_cell(cells, start + i, paths[i] if paths else None) if has and ok
                else ({"bytes": None, "path": paths[i] if paths else None} if ok else None)
                for i, (has, ok) in enumerate(zip(embedded, present))]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [_cell(cells, start + i, None) if ok else None for i, ok in enumerate(column.is_valid().to_pylist())]
    return column.to_pylist()


def _cell(cells: _DatasetColumn, row: int, path: str | None) -> ImageRef:
    return ImageRef.from_stored(_DatasetCell(cells, row), name=str(path or "<embedded>"))


def _dataset_column(dataset, names: list[str], columns: _Columns, what: str, label: str) -> str | None:
    explicit = getattr(columns, what)
    if explicit and explicit not in names:
        raise DataError(f"{label}: no column {explicit!r} (from {what}_column=); columns: {', '.join(names)}")
    found = next((name for name in columns.candidates(what) if name in names), None)
    if found is None and what == "image":
        image_type = _datasets().Image
        found = next((n for n in names if isinstance(dataset.features.get(n), image_type)), None)
    if found is None and what != "lang":
        raise DataError(
            f"{label}: no {what} column (expected one of: {', '.join(columns.candidates(what))}; "
            f"found: {', '.join(names)}); name it with {what}_column="
        )
    return found
