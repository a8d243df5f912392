"""Read parallel sentences (a source sentence and its translation) for text distillation.

Formats, by the name of each file; several files are read in the order given, as one set:

* ``.tsv`` / ``.tsv.gz``: sentence-transformers' parallel-sentences files, no header, one
  ``source<TAB>target[<TAB>target...]`` per line; each target column makes one pair.
* ``.jsonl`` / ``.json`` (JSON Lines, also ``.gz``): objects with ``source`` and ``target``
  fields (or ``english`` and ``non_english``); ``target`` may be a list of strings, one pair
  each.
* ``.parquet``, ``.arrow``, a folder of them, a ``save_to_disk`` folder (optionally
  ``FOLDER:split``) or a Hugging Face dataset name ``user/name[:split]``, loaded as
  :mod:`mlilt.data.pairs` loads them, with columns ``source``/``target``, else
  ``english``/``non_english`` (sentence-transformers' parallel-sentences datasets).

``columns=(source, target)`` names the fields of JSON Lines and the columns of datasets; TSV
files are positional.

Rules, the same in every format:

* A malformed row (a TSV line without a tab, invalid JSON, a missing field, a value that is
  not a string, text that is not UTF-8) raises :class:`DataError` naming ``file:line``
  (``source row N``, 0-based, for datasets), unless ``skip_bad``, which skips and counts it.
* Sentences are stripped of surrounding whitespace; inner text is kept as written.
* A pair whose source or target is empty is dropped and counted: empty sentences never
  reach training.
* An exact duplicate (source, target) pair, within a file or across files, is kept once.
* A set left with no pair is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlilt.data.pairs import (
    _check_text,
    _expand,
    _guarded,
    _jsonl_records,
    _kind,
    _lines,
    _load_dataset_file,
    _open_dataset,
    _RowError,
)
from mlilt.errors import DataError, UsageError

# (source, target) names tried in order when ``columns`` is not given.
DEFAULT_COLUMNS = (("source", "target"), ("english", "non_english"))
FORMATS = {
    ".tsv": "tsv", ".tsv.gz": "tsv",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".json.gz": "jsonl",
    ".parquet": "dataset", ".arrow": "dataset",
}
SUPPORTED = (
    ".tsv/.tsv.gz (source<TAB>target...), .jsonl/.jsonl.gz (JSON Lines), .parquet, .arrow, a folder "
    "of parquet/arrow files, a datasets save_to_disk folder (optionally FOLDER:split), or a Hugging "
    "Face dataset name user/name[:split]"
)
_BATCH = 10_000  # dataset rows converted to Python per step


@dataclass(frozen=True)
class ParallelSet:
    """Parallel pairs: ``targets[i]`` is a translation of ``sources[i]``.

    ``counts`` says what reading did: ``rows`` read (non-blank lines and dataset rows, bad
    ones included), ``pairs`` kept, ``skipped_bad`` rows, and the pairs dropped as empty
    (``empty_dropped``) or as exact duplicates (``duplicates_dropped``).
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    counts: dict[str, int]
    files: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if len(self.sources) != len(self.targets):
            raise UsageError(f"{len(self.sources)} sources but {len(self.targets)} targets; give one target per source")

    def __len__(self) -> int:
        return len(self.sources)

    def summary(self) -> dict:
        """Counts, the files read and a content hash for pack metadata: which data made this pack.

        The hash covers every (source, target) pair in order, so reordering, adding or editing
        a pair changes it and renaming a file does not.
        """
        digest = hashlib.sha256()
        for source, target in zip(self.sources, self.targets):
            digest.update(json.dumps([source, target], ensure_ascii=False).encode("utf-8") + b"\n")
        return {**self.counts, "files": list(self.files), "sha256": digest.hexdigest()}


def read_parallel(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    skip_bad: bool = False,
    columns: tuple[str, str] | None = None,
) -> ParallelSet:
    """Read parallel pairs from one or more files; see the module docstring for formats and rules."""
    labels = _labels(paths)
    columns = _checked_columns(columns)
    collector = _Collector(skip_bad)
    for label in labels:
        for where, row in _rows(label, columns):
            collector.add(where, row)
    return collector.finish(labels)


def _labels(paths: Any) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise UsageError(f"paths must be a path or a non-empty list of paths, got {paths!r}")
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"paths must be paths or dataset names, got {type(path).__name__}")
    return [str(os.fspath(path)) for path in paths]


def _checked_columns(columns: Any) -> tuple[tuple[str, str], ...]:
    """The (source, target) name pairs to try, in order."""
    if columns is None:
        return DEFAULT_COLUMNS
    if (not isinstance(columns, (tuple, list)) or len(columns) != 2
            or not all(isinstance(name, str) and name.strip() for name in columns)):
        raise UsageError(f"columns must be two non-empty names (source, target), got {columns!r}")
    return ((columns[0].strip(), columns[1].strip()),)


# --------------------------------------------------------------------------- rows


class _Collector:
    """Turns raw rows into pairs, applying the rules shared by every format."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.sources: list[str] = []
        self.targets: list[str] = []
        self.seen: set[tuple[str, str]] = set()
        self.counts: Counter[str] = Counter()
        self.first_problem: str | None = None

    def add(self, where: str, row: tuple[Any, Any] | _RowError) -> None:
        """One row: (source value, target value or list of them), or the problem found reading it."""
        self.counts["rows"] += 1
        try:
            if isinstance(row, _RowError):
                raise row
            source, targets = _sentences(*row)
        except _RowError as problem:
            message = f"{where}: {problem.message}"
            if not self.skip_bad:
                raise DataError(message) from None
            self.counts["skipped_bad"] += 1
            self.first_problem = self.first_problem or message
            return
        for target in targets:
            if not source or not target:
                self.counts["empty_dropped"] += 1
            elif (source, target) in self.seen:
                self.counts["duplicates_dropped"] += 1
            else:
                self.seen.add((source, target))
                self.sources.append(source)
                self.targets.append(target)

    def finish(self, labels: list[str]) -> ParallelSet:
        counts = {"rows": self.counts["rows"], "pairs": len(self.sources)}
        counts.update((key, self.counts[key]) for key in ("skipped_bad", "empty_dropped", "duplicates_dropped"))
        if self.sources:
            return ParallelSet(tuple(self.sources), tuple(self.targets), counts, tuple(labels))
        dropped = ", ".join(f"{key.replace('_', ' ')} {n}" for key, n in counts.items() if key != "pairs")
        problem = f"; first problem: {self.first_problem}" if self.first_problem else ""
        raise DataError(f"no parallel pairs left in {', '.join(labels)} ({dropped}){problem}")


def _sentences(source: Any, target: Any) -> tuple[str, list[str]]:
    """The stripped source and targets of one row; _RowError if a value is not text."""
    if not isinstance(source, str):
        raise _RowError("bad_value", f"source must be a string, got {_kind(source)}")
    targets = target if isinstance(target, list) else [target]
    if not targets:
        raise _RowError("bad_value", "target list is empty")
    for item in targets:
        if not isinstance(item, str):
            raise _RowError("bad_value", f"target must be a string (or a list of strings), got {_kind(item)}")
    _check_text(source, "source")
    for item in targets:
        _check_text(item, "target")
    return source.strip(), [item.strip() for item in targets]


def _rows(label: str, columns: tuple[tuple[str, str], ...]) -> Iterator[tuple[str, tuple[Any, Any] | _RowError]]:
    """(where, row) of one file, folder or dataset name."""
    path = _expand(label)
    kind = FORMATS.get(_suffix(path))
    if path.is_file():
        if kind == "tsv":
            return _tsv_rows(path, label)
        if kind == "jsonl":
            return _jsonl_rows(path, label, columns)
        if kind == "dataset":
            return _dataset_rows(_load_dataset_file(path, label), label, columns)
        raise DataError(f"{label}: unsupported format {_suffix(path) or '(no extension)'!r}; supported: {SUPPORTED}")
    opened = _open_dataset(label, hub=kind is None)  # a missing x.tsv is not a Hub name
    if opened is None:
        raise DataError(f"{label}: no such file or folder")
    return _dataset_rows(opened[0], label, columns)


def _suffix(path: Path) -> str:
    """``.tsv.gz`` for ``x.tsv.gz``, ``.tsv`` for ``x.tsv``: the part of the name FORMATS keys on."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _tsv_rows(path: Path, label: str) -> Iterator[tuple[str, tuple[str, list[str]] | _RowError]]:
    """``source<TAB>target[<TAB>target...]`` per non-blank line; no quoting, no header."""
    for where, _, text in _lines(path, label):
        if isinstance(text, _RowError):
            yield where, text
            continue
        cells = text.split("\t")
        if len(cells) < 2:
            yield where, _RowError("malformed_row", "no tab: expected source<TAB>target")
            continue
        yield where, (cells[0], cells[1:])


def _jsonl_rows(path: Path, label: str, columns: tuple[tuple[str, str], ...]) -> Iterator[tuple[str, Any]]:
    for where, record in _jsonl_records(path, label):
        if isinstance(record, _RowError):
            yield where, record
            continue
        names = _names(record, columns)
        if names is None:
            yield where, _RowError("missing_field", _missing(list(record), columns))
            continue
        yield where, (record[names[0]], record[names[1]])


def _names(present, columns: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """The first (source, target) pair of names that are both present."""
    return next(((s, t) for s, t in columns if s in present and t in present), None)


def _missing(found: list[str], columns: tuple[tuple[str, str], ...]) -> str:
    """What a row lacks: one field of a pair it half has, else a whole pair."""
    listed = ", ".join(map(str, found)) or "none"
    for source, target in columns:
        if source in found or target in found:
            return f"missing {target if source in found else source!r} field (found: {listed})"
    expected = " or ".join(f"{s!r} and {t!r}" for s, t in columns)
    return f"missing source and target fields (expected {expected}; found: {listed})"


# --------------------------------------------------------------------------- datasets


def _dataset_rows(dataset, label: str, columns: tuple[tuple[str, str], ...]) -> Iterator[tuple[str, Any]]:
    """Rows of a datasets.Dataset, converted to Python in batches."""
    names = list(dataset.column_names)
    chosen = _names(names, columns)
    if chosen is None:
        tried = "; ".join(f"{s}, {t}" for s, t in columns)
        raise DataError(
            f"{label}: no source and target columns (tried: {tried}; found: {', '.join(names)}); "
            "name them with columns=(source, target)"
        )
    source, target = chosen
    dataset = _guarded(label, lambda: dataset.select_columns([source, target]))
    index = 0
    for batch in dataset.iter(batch_size=_BATCH):
        for pair in zip(batch[source], batch[target]):
            yield f"{label} row {index}", pair
            index += 1
