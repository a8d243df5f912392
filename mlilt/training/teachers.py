"""Distillation teachers: an aligned model whose embeddings of source sentences a student learns.

A teacher is an mlilt pack (a folder or an installed name): its text side, in the pack's own
language, gives the targets, and its image side is the space the student lives in. Teacher
embeddings are frozen, so they are computed once and kept in the feature cache, keyed by the
teacher's fingerprint (its text tower, the pack's tensors and language) and each sentence's
sha256: a second run with the same teacher and sentences computes none, and a changed teacher
never reuses another's entries.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mlilt.data.feature_cache import FeatureCache, cached_rows
from mlilt.errors import PackError, UsageError
from mlilt.modeling.encode import encode_texts
from mlilt.packs import Pack, read_pack, resolve_pack, side_id
from mlilt.speed import text_side_of


class PackTeacher:
    """The text side of an mlilt pack, encoding in the pack's language."""

    def __init__(self, spec: str, pack: Pack):
        self.spec = spec
        self.pack = pack
        self.language = pack.config.language
        self.width = pack.config.embed_dim
        self._side = None
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """The identity of the pack's text space in its language: text tower plus text tensors."""
        if self._fingerprint is None:
            tower = self.pack.config.towers["text"]["fingerprint"]
            self._fingerprint = side_id(f"teacher:{self.language}:{tower}", self.pack.side_tensors("text"))
        return self._fingerprint

    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised embeddings [N, width], as ``mlilt.load(pack).encode_text`` gives them."""
        if self._side is None:
            self._side = text_side_of(self.pack)
        with torch.no_grad():
            return encode_texts(self._side, sentences, batch_size)

    def release(self) -> None:
        """Drop the loaded text side (the cached embeddings are all a run needs)."""
        self._side = None


def load_teacher(spec: str) -> PackTeacher:
    """The teacher ``spec`` names: an mlilt pack folder or installed pack name."""
    try:
        return PackTeacher(spec, read_pack(resolve_pack(spec)))
    except PackError as error:
        raise UsageError(f"--teacher {spec!r}: {error}. A teacher is an mlilt pack (folder or installed "
                         f"name) whose text side gives the targets, e.g. langpacks/en") from error


def teacher_embeddings(teacher: PackTeacher, sentences: list[str], cache_root: Path | None = None,
                       use_cache: bool = True, batch_size: int = 64, progress=None) -> torch.Tensor:
    """The teacher's embeddings [N, width] of ``sentences``, through the feature cache."""
    cache = FeatureCache(teacher, cache_root) if use_cache else None
    keys = [sentence_key(s) for s in sentences] if cache is not None else None
    return cached_rows(len(sentences), teacher.width,
                       lambda chunk: teacher.encode([sentences[i] for i in chunk], batch_size).numpy(),
                       keys, cache, batch_size, progress)


def sentence_key(sentence: str) -> str:
    return hashlib.sha256(sentence.encode("utf-8")).hexdigest()
