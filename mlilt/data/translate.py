"""Machine-translate captions (or sentences) with a seq2seq model: new pairs, or parallel text.

``translate_data`` reads image-caption pairs (any format :func:`~mlilt.data.pairs.read_pairs`
reads) or plain sentences (``.txt``, or a ``.tsv`` without an image column: its first
column), translates them in batches and writes, in input order:

* ``pairs``: JSON Lines ``{"image", "caption", "lang", "source_caption"}``, the same images
  with translated captions (image paths relative to the output's folder); or
* ``parallel``: ``source<TAB>target`` lines for ``mlilt train --parallel`` (or JSON Lines
  ``{"source", "target"}`` when the output is named ``.jsonl``).

With ``min_chrf`` each translation is translated back and kept only if the sentence chrF
(sacrebleu) of the back-translation against the source is at least ``min_chrf``; kept rows
carry the score (``chrf``) in JSON Lines outputs. Empty translations are always dropped.

Resuming: rows go to ``OUT.partial``, flushed and fsynced per batch; its sidecar
``OUT.partial.translate.json`` records the settings and how many input rows and bytes are
done. A rerun with the same settings truncates the partial file to the recorded size (a torn
last line is dropped and redone) and goes on; the finished file is renamed to ``OUT`` with
its sidecar ``OUT.translate.json``. A rerun with other settings refuses unless
``overwrite``, and even then the old ``OUT`` stays until the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlilt.data.images import ImageRef
from mlilt.data.pairs import IMAGE_FIELDS, _expand, _lines, _RowError, read_pairs
from mlilt.data.translation_models import Direction, Translator, direction
from mlilt.errors import DataError, UsageError
from mlilt.files.atomic import write_text

FORMATS = ("pairs", "parallel")
SIDECAR = ".translate.json"
SIDECAR_VERSION = 1
_SENTENCE_SUFFIXES = (".txt", ".txt.gz", ".tsv.gz")
Progress = Callable[[int, int], None]  # (input rows done, total)


@dataclass(frozen=True)
class Source:
    """One text to translate; ``image`` for pairs, ``where`` ("file:line") for messages."""

    text: str
    image: ImageRef | None
    where: str


@dataclass
class TranslateResult:
    """What a run did. ``rows`` input rows; ``kept`` written; the rest dropped as empty
    translations or below ``min_chrf``; ``resumed_from`` rows found done at the start."""

    out: Path
    rows: int
    kept: int = 0
    dropped_empty: int = 0
    dropped_chrf: int = 0
    resumed_from: int = 0
    already_complete: bool = False
    direction: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.out} is already complete ({self.kept} of {self.rows} rows); nothing to do"
        parts = [f"kept {self.kept} of {self.rows} rows"]
        if self.dropped_chrf:
            parts.append(f"dropped {self.dropped_chrf} below --min-chrf")
        if self.dropped_empty:
            parts.append(f"dropped {self.dropped_empty} empty translations")
        if self.resumed_from:
            parts.append(f"resumed after row {self.resumed_from}")
        return f"wrote {self.out}: " + ", ".join(parts)


# --------------------------------------------------------------------------- entry point


def translate_data(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str,
    model: str,
    src: str | None = None,
    fmt: str | None = None,
    back_model: str | None = None,
    min_chrf: float | None = None,
    batch_size: int = 32,
    num_beams: int = 4,
    max_length: int = 256,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: Progress | None = None,
) -> TranslateResult:
    """Translate ``data`` into language ``to`` with ``model``; see the module docstring."""
    from mlilt.data import translation_models as tm

    _check_numbers(batch_size, num_beams, max_length, min_chrf)
    if back_model is not None and min_chrf is None:
        raise UsageError("--back-model is only used for the round-trip filter: give --min-chrf too")
    out = Path(_expand(os.fspath(out))).absolute()
    sources, kind, data_lang = read_sources(data, src, skip_bad)
    fmt = _output_format(fmt, kind, out)
    embedded = next((s for s in sources if s.image is not None and s.image.path is None), None)
    if fmt == "pairs" and embedded is not None:
        raise DataError(f"{embedded.where}: the image is embedded in the dataset, not a file; --format pairs "
                        "writes image paths (use --format parallel, or save the images as files)")
    src = src or data_lang
    tokenizer, family = tm.load_tokenizer(model)
    forward = direction(family, tokenizer, model, src, to)
    backward = _back_direction(forward, family, tokenizer, model, back_model, min_chrf)
    settings = _settings(data, sources, model, forward, fmt, num_beams, max_length, min_chrf, backward)
    files = _Files(out)
    action = files.check(settings, overwrite)
    result = TranslateResult(out, len(sources), direction={"src": forward.src_code, "to": forward.tgt_code,
                                                           "family": family})
    if action == "complete":
        result.already_complete = True
        for key, value in files.final_meta().get("counts", {}).items():
            setattr(result, key, value)
        return result
    device = tm.resolve_device(device)
    translator = Translator(tm.load_model(model, device, dtype), tokenizer, forward,
                            num_beams=num_beams, max_length=max_length)
    back = _back_translator(translator, backward, back_model, device, dtype)
    state = files.start(settings, action)  # the first write: after every check and load
    result.resumed_from = state["done"]
    for key in ("kept", "dropped_empty", "dropped_chrf"):
        setattr(result, key, state["counts"].get(key, 0))
    writer = _Writer(fmt, out, to, min_chrf is not None)
    _run(sources, translator, back, min_chrf, writer, files, settings, batch_size, result, progress)
    return result


def _check_numbers(batch_size: int, num_beams: int, max_length: int, min_chrf: float | None) -> None:
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if min_chrf is not None and not 0.0 <= float(min_chrf) <= 100.0:
        raise UsageError(f"min_chrf must be between 0 and 100 (chrF), got {min_chrf}")


def _output_format(fmt: str | None, kind: str, out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".tsv", ".txt"):
        raise UsageError(f"--out {out.name}: name it .jsonl (pairs, or parallel JSON Lines) or .tsv (parallel)")
    if fmt is None:
        fmt = "pairs" if suffix == ".jsonl" and kind == "pairs" else "parallel"
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "pairs" and kind != "pairs":
        raise UsageError("--format pairs needs image-caption pairs as --data; sentences can only become "
                         "--format parallel")
    if fmt == "pairs" and suffix != ".jsonl":
        raise UsageError(f"--format pairs writes JSON Lines: name the output .jsonl, not {out.name}")
    return fmt


def _back_direction(forward: Direction, family: str, tokenizer, model: str, back_model: str | None,
                    min_chrf: float | None) -> tuple[str, Direction, object] | None:
    """(back model, its direction, its tokenizer) for the round-trip filter; checked before any work."""
    from mlilt.data import translation_models as tm

    if min_chrf is None:
        return None
    if forward.src is None:
        raise UsageError("the round-trip filter needs the source language: give --src")
    if back_model is None:
        if family == "marian":
            raise UsageError(f"--min-chrf with a Marian model needs --back-model, the reverse direction "
                             f"(e.g. Helsinki-NLP/opus-mt-{forward.tgt}-{forward.src})")
        return model, direction(family, tokenizer, model, forward.tgt, forward.src), tokenizer
    back_tokenizer, back_family = tm.load_tokenizer(back_model)
    way = direction(back_family, back_tokenizer, back_model, forward.tgt, forward.src)
    return back_model, way, back_tokenizer


def _back_translator(forward: Translator, backward, back_model: str | None, device: str, dtype: str):
    from mlilt.data import translation_models as tm

    if backward is None:
        return None
    name, way, tokenizer = backward
    if back_model is None:  # the same multilingual model, the other way round
        model = forward.model
    else:
        model = tm.load_model(name, device, dtype)
    return Translator(model, tokenizer, way, num_beams=forward.num_beams, max_length=forward.max_length)


# --------------------------------------------------------------------------- inputs


def read_sources(data: str | os.PathLike, src: str | None, skip_bad: bool) -> tuple[list[Source], str, str | None]:
    """(texts to translate, "pairs" or "sentences", the one language the pairs name or None)."""
    if not isinstance(data, (str, os.PathLike)):
        raise UsageError(f"data must be a path, got {type(data).__name__}")
    label = os.fspath(data)
    path = _expand(label)
    if path.is_file() and _is_sentences(path, label):
        return _read_sentences(path, label, skip_bad), "sentences", None
    pairs = read_pairs(label, lang=src, skip_bad=skip_bad, check_images=False)
    sources = [Source(pair.caption, pair.image, pair.source) for pair in pairs]
    langs = sorted({pair.lang for pair in pairs if pair.lang})
    if src is None and len(langs) > 1:
        raise UsageError(f"{label} holds captions in several languages ({', '.join(langs)}); choose one "
                         "with --src")
    return sources, "pairs", (langs[0] if langs else None)


def _is_sentences(path: Path, label: str) -> bool:
    """A ``.txt`` file, or a ``.tsv`` whose first line is not an image-caption header."""
    name = path.name.lower()
    if name.endswith(_SENTENCE_SUFFIXES):
        return True
    if not name.endswith(".tsv"):
        return False
    for _, _, text in _lines(path, label):
        header = {cell.strip().lower() for cell in text.split("\t")} if isinstance(text, str) else set()
        return not header & set(IMAGE_FIELDS)
    return False


def _read_sentences(path: Path, label: str, skip_bad: bool) -> list[Source]:
    """The first tab-separated cell of each non-blank line, whitespace collapsed."""
    sources = []
    for where, _, text in _lines(path, label):
        problem = text if isinstance(text, _RowError) else None
        sentence = "" if problem else " ".join(text.split("\t")[0].split())
        if not sentence and not problem:
            problem = _RowError("empty", "the sentence (first column) is empty")
        if problem:
            if not skip_bad:
                raise DataError(f"{where}: {problem.message}")
            continue
        sources.append(Source(sentence, None, where))
    if not sources:
        raise DataError(f"{label}: no sentences to translate")
    return sources


def _settings(data, sources: Sequence[Source], model: str, forward: Direction, fmt: str, num_beams: int,
              max_length: int, min_chrf: float | None, backward) -> dict:
    """What decides the output's content: a rerun resumes only when all of it is equal."""
    digest = hashlib.sha256()
    for source in sources:
        image = str(source.image.path) if source.image is not None and source.image.path else ""
        digest.update(json.dumps([source.text, image], ensure_ascii=False).encode("utf-8") + b"\n")
    return {
        "data": _identity(os.fspath(data)), "data_sha256": digest.hexdigest(), "rows": len(sources),
        "model": _identity(model), "src": forward.src_code, "to": forward.tgt_code, "lang": forward.tgt,
        "format": fmt, "num_beams": num_beams, "max_length": max_length,
        "min_chrf": None if min_chrf is None else float(min_chrf),
        "back_model": None if backward is None else _identity(backward[0]),
    }


def _identity(name: str) -> str:
    """A folder's absolute path, else the name as written (a Hub name or dataset)."""
    path = _expand(name)
    return str(path.absolute()) if path.exists() else name


# --------------------------------------------------------------------------- outputs


class _Writer:
    """Turns (source, translation, score) into output lines of one format."""

    def __init__(self, fmt: str, out: Path, lang: str, scored: bool):
        self.fmt, self.folder, self.lang, self.scored = fmt, out.parent, lang, scored
        self.jsonl = out.suffix.lower() == ".jsonl"

    def line(self, source: Source, target: str, score: float | None) -> bytes:
        if self.fmt == "parallel" and not self.jsonl:
            return f"{source.text}\t{target}\n".encode("utf-8")
        if self.fmt == "parallel":
            row = {"source": source.text, "target": target}
        else:
            row = {"image": self._image(source), "caption": target, "lang": self.lang,
                   "source_caption": source.text}
        if self.scored:
            row["chrf"] = score
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")

    def _image(self, source: Source) -> str:
        try:
            return os.path.relpath(source.image.path, self.folder)
        except ValueError:  # another drive (Windows)
            return str(source.image.path)


class _Files:
    """OUT, OUT.partial and their sidecars, and the decision to start, resume or refuse."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.meta = out.with_name(out.name + SIDECAR)
        self.partial_meta = out.with_name(self.partial.name + SIDECAR)

    def check(self, settings: dict, overwrite: bool) -> str:
        """What to do, without writing: "complete" (OUT is done), "resume" or "fresh"; refuses
        when an output or partial output of other settings is in the way."""
        pending = _read_meta(self.partial_meta)
        if pending and pending.get("complete") and not self.partial.exists() and self.out.exists():
            os.replace(self.partial_meta, self.meta)  # finish a rename cut short
            pending = None
        if overwrite:
            return "fresh"
        if pending and pending.get("settings") == settings and self.partial.exists():
            return "resume"
        if self.out.exists():
            final = _read_meta(self.meta)
            if final and final.get("settings") == settings and final.get("complete"):
                return "complete"
            raise UsageError(_refusal(self.out, final, settings))
        started = pending is not None and pending.get("done", 0) > 0
        if started or (self.partial.exists() and self.partial.stat().st_size > 0):
            raise UsageError(_refusal(self.partial, pending, settings))
        return "fresh"  # nothing, or a partial output that never finished a batch

    def start(self, settings: dict, action: str) -> dict:
        """The progress to continue from: {"done", "bytes", "counts"}."""
        if action == "resume":
            return self._resume(_read_meta(self.partial_meta) or {})
        state = {"done": 0, "bytes": 0, "counts": {}}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.save(settings, state, complete=False)
        self.partial.write_bytes(b"")
        return state

    def final_meta(self) -> dict:
        return _read_meta(self.meta) or {}

    def _resume(self, pending: dict) -> dict:
        size = self.partial.stat().st_size
        if size < pending["bytes"]:
            raise DataError(f"{self.partial} is shorter ({size} bytes) than its sidecar records "
                            f"({pending['bytes']}); pass --overwrite to start over")
        if size > pending["bytes"]:  # rows written after the last recorded batch, maybe torn: redone
            with open(self.partial, "r+b") as handle:
                handle.truncate(pending["bytes"])
        return {key: pending[key] for key in ("done", "bytes", "counts")}

    def save(self, settings: dict, state: dict, complete: bool) -> None:
        from mlilt import __version__

        meta = {"format_version": SIDECAR_VERSION, "mlilt_version": __version__, "command": "mlilt data translate",
                "settings": settings, "complete": complete, **state}
        write_text(self.partial_meta, json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        os.replace(self.partial, self.out)
        os.replace(self.partial_meta, self.meta)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _refusal(path: Path, meta: dict | None, settings: dict) -> str:
    if not meta or not isinstance(meta.get("settings"), dict):
        why = f"{path} exists and was not written by mlilt data translate (no readable {path.name}{SIDECAR})"
    else:
        changed = [f"{key}: {meta['settings'].get(key)!r} -> {value!r}" for key, value in settings.items()
                   if meta["settings"].get(key) != value]
        why = f"{path} was written with other settings ({'; '.join(changed) or 'unknown'})"
    return f"{why}; pass --overwrite to replace it (it stays until the new output is complete) or choose another --out"


# --------------------------------------------------------------------------- the loop


def _run(sources: list[Source], translator: Translator, back: Translator | None, min_chrf: float | None,
         writer: _Writer, files: _Files, settings: dict, batch_size: int, result: TranslateResult,
         progress: Progress | None) -> None:
    """Translate batch by batch from ``result.resumed_from``; each batch is made durable before
    the sidecar counts it, so an interruption loses at most the batch in flight."""
    done, size = result.resumed_from, files.partial.stat().st_size
    if progress:
        progress(done, len(sources))
    with open(files.partial, "ab") as handle:
        while done < len(sources):
            batch = sources[done:done + batch_size]
            lines = _translate_batch(batch, translator, back, min_chrf, writer, result)
            data = b"".join(lines)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            done, size = done + len(batch), size + len(data)
            files.save(settings, _state(done, size, result), complete=False)
            if progress:
                progress(done, len(sources))
    files.save(settings, _state(done, size, result), complete=True)
    files.finish()


def _state(done: int, size: int, result: TranslateResult) -> dict:
    counts = {"kept": result.kept, "dropped_empty": result.dropped_empty, "dropped_chrf": result.dropped_chrf}
    return {"done": done, "bytes": size, "counts": counts}


def _translate_batch(batch: list[Source], translator: Translator, back: Translator | None,
                     min_chrf: float | None, writer: _Writer, result: TranslateResult) -> list[bytes]:
    targets = translator.translate([source.text for source in batch])
    keep = [i for i, target in enumerate(targets) if target]
    result.dropped_empty += len(batch) - len(keep)
    scores: dict[int, float] = {}
    if back is not None:
        import sacrebleu

        backs = back.translate([targets[i] for i in keep])
        for i, text in zip(keep, backs):
            scores[i] = round(sacrebleu.sentence_chrf(text, [batch[i].text]).score, 2)
        kept = [i for i in keep if scores[i] >= min_chrf]
        result.dropped_chrf += len(keep) - len(kept)
        keep = kept
    result.kept += len(keep)
    return [writer.line(batch[i], targets[i], scores.get(i)) for i in keep]


__all__ = ["translate_data", "read_sources", "TranslateResult"]
