"""Distillation teachers: an aligned model whose embeddings of source sentences a student learns.

A teacher is one of

* an mlilt pack (folder or installed name): its text side, in the pack's own language; the
  student lives in the pack's image space (the pack is its anchor);
* an open_clip model ``MODEL:PRETRAINED``: its ``encode_text``, normalised, as CLIP_benchmark
  uses it; the student lives in that model's image space (the model is its anchor);
* a sentence-transformers model (name or folder): ``SentenceTransformer(...).encode``,
  normalised; it has no image space, so the student needs ``--anchor`` (the space its
  embeddings live in, e.g. open_clip ``ViT-B-32:openai`` for sentence-transformers'
  ``clip-ViT-B-32``) or image-caption pairs to learn one.

Targets are L2-normalised because a pack's text embeddings are. Teacher embeddings are
frozen, so they are computed once and kept in the feature cache, keyed by the teacher's
fingerprint and each sentence's sha256: a second run with the same teacher and sentences
computes none, and a changed teacher never reuses another's entries.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from mlilt.data.feature_cache import FeatureCache, cached_rows
from mlilt.errors import PackError, TowerLoadError, UsageError
from mlilt.modeling.encode import encode_texts
from mlilt.packs import Pack, read_pack, resolve_pack, side_id
from mlilt.speed import text_side_of
from mlilt.towers.base import load_error, weights_fingerprint
from mlilt.training.anchors import is_open_clip_spec

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # a Hugging Face Hub model id (org/name)


class Teacher:
    """What every teacher gives: ``width``, ``fingerprint()``, ``encode()``, ``release()``, and
    ``anchor``: the anchor spec whose image space its embeddings live in (None: none)."""

    width: int
    anchor: str | None = None
    language: str | None = None  # the source sentences' language, where the teacher knows it

    def __init__(self, spec: str):
        self.spec = spec
        self._encoder = None
        self._fingerprint: str | None = None

    def encoder(self):
        """The loaded model, loaded on first use (again after ``release``)."""
        if self._encoder is None:
            self._encoder = self._load_encoder()
        return self._encoder

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised embeddings [N, width]."""
        with torch.no_grad():
            return self._encode(self.encoder(), sentences, batch_size)

    def release(self) -> None:
        """Drop the loaded model (the cached embeddings are all a run needs)."""
        self._encoder = None

    def _compute_fingerprint(self) -> str:
        raise NotImplementedError

    def _load_encoder(self):
        raise NotImplementedError

    def _encode(self, encoder, sentences: list[str], batch_size: int) -> torch.Tensor:
        return encode_texts(encoder, sentences, batch_size)


class PackTeacher(Teacher):
    """The text side of an mlilt pack, encoding in the pack's language, as ``mlilt.load(pack)
    .encode_text`` does."""

    def __init__(self, spec: str, pack: Pack):
        super().__init__(spec)
        self.anchor = spec
        self.pack = pack
        self.language = pack.config.language
        self.width = pack.config.embed_dim

    def _compute_fingerprint(self) -> str:
        # the pack's text space in its language: text tower plus text tensors
        tower = self.pack.config.towers["text"]["fingerprint"]
        return side_id(f"teacher:{self.language}:{tower}", self.pack.side_tensors("text"))

    def _load_encoder(self):
        return text_side_of(self.pack)


class OpenClipTeacher(Teacher):
    """An open_clip model's ``encode_text``, normalised."""

    def __init__(self, spec: str):
        super().__init__(spec)
        self.anchor = spec
        self.width = self.encoder().tower.width

    def _compute_fingerprint(self) -> str:
        return side_id(f"teacher:open_clip:{self.encoder().tower.fingerprint()}", {})

    def _load_encoder(self):
        from mlilt.evaluation.reference import reference_sides

        return reference_sides(self.spec)[0]


class SentenceTransformerTeacher(Teacher):
    """``SentenceTransformer(spec).encode``, normalised: every module (pooling, Dense,
    Normalize) and the model's configured default prompt as the library applies them."""

    def __init__(self, spec: str):
        super().__init__(spec)
        model = self.encoder()
        # renamed in sentence-transformers 6; older releases have only the long name
        self.width = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()

    def _compute_fingerprint(self) -> str:
        model = self.encoder()
        config = {"class": "SentenceTransformer", "prompts": model.prompts,
                  "default_prompt_name": model.default_prompt_name}
        return side_id(f"teacher:sentence-transformers:{weights_fingerprint(model, config)}", {})

    def _load_encoder(self):
        from sentence_transformers import SentenceTransformer

        try:
            return SentenceTransformer(self.spec, device="cpu")
        except (OSError, ValueError) as error:
            raise load_error(self.spec, "a sentence-transformers teacher", error) from error

    def _encode(self, model, sentences: list[str], batch_size: int) -> torch.Tensor:
        embeddings = model.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        return F.normalize(embeddings.float().cpu(), dim=-1)


def load_teacher(spec: str) -> Teacher:
    """The teacher ``spec`` names: a pack, else an open_clip model, else a sentence-transformers model."""
    try:
        return PackTeacher(spec, read_pack(resolve_pack(spec)))
    except PackError as error:
        pack_error = error
    if is_open_clip_spec(spec):
        return OpenClipTeacher(spec)
    if Path(spec).expanduser().is_dir() or HUB_ID.match(spec):
        try:
            return SentenceTransformerTeacher(spec)
        except TowerLoadError as error:
            raise UsageError(f"--teacher {spec!r} is not an mlilt pack ({pack_error}) and {error}") from error
    raise UsageError(f"--teacher {spec!r}: {pack_error}. A teacher is an mlilt pack (folder or installed name, "
                     f"e.g. langpacks/en), an open_clip model MODEL:PRETRAINED (e.g. ViT-B-32:openai) or a "
                     f"sentence-transformers model (folder or hub name, e.g. sentence-transformers/clip-ViT-B-32)")


def teacher_embeddings(teacher: Teacher, sentences: list[str], cache_root: Path | None = None,
                       use_cache: bool = True, batch_size: int = 64, progress=None) -> torch.Tensor:
    """The teacher's embeddings [N, width] of ``sentences``, through the feature cache."""
    cache = FeatureCache(teacher, cache_root) if use_cache else None
    keys = [sentence_key(s) for s in sentences] if cache is not None else None
    return cached_rows(len(sentences), teacher.width,
                       lambda chunk: teacher.encode([sentences[i] for i in chunk], batch_size).numpy(),
                       keys, cache, batch_size, progress)


def sentence_key(sentence: str) -> str:
    return hashlib.sha256(sentence.encode("utf-8")).hexdigest()
