"""sentence-transformers text towers: a model loaded by ``SentenceTransformer`` itself, so that
every module it saved counts, as ``SentenceTransformer.encode`` counts it.

A sentence-transformers model is a chain: a ``Transformer`` (a Hugging Face encoder and its
tokenizer), then modules on its token embeddings: ``Pooling`` (any of its modes, or several
concatenated), ``Dense``, ``Normalize``, ``LayerNorm``, ``Dropout``. The tower keeps the
encoder as ``model``, where an ``HFTextTower`` keeps it, so methods (``ln``, ``adapter``,
``lora``, ``bitfit``, ``unlock``, ``top:K``) find the same blocks under the same names, and the
padding-free runner (``mlilt.speed.packed``) computes its last hidden state as it does for any
BERT-family tower (checked against the padded forward on the first batch, as always). The
modules after the encoder are the library's own objects, kept in ``head`` and run in order on
``{"token_embeddings", "attention_mask"}``; they come after the last block, so ``unlock:K`` and
``top:K`` count a ``Dense`` among the layers after the blocks.

Text is what ``encode`` feeds the encoder: the prompt, then the caption, through the
``Transformer``'s tokenizer (with its ``do_lower_case``), cut at the smaller of mlilt's
``max_length`` and the model's ``max_seq_length``. The prompt (``prefix``) is, in order: the
``prefix`` asked for; the prompt named by the model's ``default_prompt_name`` (what ``encode``
uses when given none); its ``query`` prompt (what ``encode_query`` uses: a caption is the
query side of text-image retrieval); else ``default_prefix`` (E5's ``query: `` for e5 names).
A ``Pooling`` with ``include_prompt=False`` leaves the prompt's tokens out, as in ``encode``.

Models whose first module is not a plain text ``Transformer`` (static embeddings, routers,
multimodal or decoder backbones, query expansion), or that have modules this tower cannot run
on token embeddings alone, are refused with the reason rather than loaded half right.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mlilt.errors import TowerLoadError, UsageError
from mlilt.towers.base import load_error
from mlilt.towers.hf_text import HFTextTower, TextRunner, _hf_tokenizer, quiet_transformers, tokenizer_digest

MODULES_FILE = "modules.json"  # what makes a folder or hub repository a sentence-transformers model
# Modules after the Transformer that need nothing but the token embeddings and attention mask.
HEAD_MODULES = ("Pooling", "Dense", "Normalize", "LayerNorm", "Dropout")
# What a plain text encoder's Transformer module computes (sentence-transformers 6).
PLAIN_TEXT_MODALITIES = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


class SentenceTransformerTower(HFTextTower):
    """A frozen sentence-transformers model: its encoder (``model``), tokenizer and prompt as in
    ``HFTextTower``, and its modules after the encoder (``head``: Pooling, Dense, Normalize, ...)
    run on the encoder's last hidden state. ``pooling`` names the Pooling module's mode(s)
    (``cls``, ``max``, ``mean+max``, ...); it is decided by the model, not chosen."""

    def __init__(self, spec: str, model, tokenizer, head: list[nn.Module], pooling: str, max_length: int,
                 prefix: str = "", prompt_length: int | None = None, truncate_dim: int | None = None,
                 width: int | None = None, load_tokenizer=None, runner: TextRunner | None = None):
        super().__init__(spec, model, tokenizer, pooling=pooling, max_length=max_length, prefix=prefix,
                         load_tokenizer=load_tokenizer, runner=runner)
        self.head = nn.ModuleList(head)
        self.prompt_length = prompt_length or None
        self.truncate_dim = truncate_dim
        self.width = width if width is not None else self._output_width()
        self.config["sentence_transformers"] = {
            "modules": [module_config(module) for module in head], "prompt_length": self.prompt_length,
            "truncate_dim": truncate_dim}

    @staticmethod
    def checked_pooling(pooling: str) -> str:
        return str(pooling)

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"token_embeddings": hidden, "attention_mask": attention_mask}
        if self.prompt_length:
            features["prompt_length"] = self.prompt_length
        for module in self.head:
            features = module(features)
        embedding = features["sentence_embedding"]
        return embedding if self.truncate_dim is None else embedding[..., :self.truncate_dim]

    def _output_width(self) -> int:
        with torch.no_grad():
            hidden = torch.zeros(1, 1, self.model.config.hidden_size)
            return int(self.pool_hidden(hidden, torch.ones(1, 1, dtype=torch.long)).shape[-1])


def module_config(module: nn.Module) -> dict:
    """A head module's class and saved config: part of the tower's fingerprint."""
    get_config = getattr(module, "get_config_dict", None)
    return {"type": f"{type(module).__module__}.{type(module).__qualname__}",
            "config": get_config() if callable(get_config) else {}}


# --------------------------------------------------------------------------- detection


def is_sentence_transformers(source: str | Path) -> bool:
    """Whether ``source`` is a sentence-transformers model: a folder with ``modules.json``, or a
    hub repository with one (in the local cache; asked of the hub unless offline mode is on)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return (folder / MODULES_FILE).is_file()
    return _hub_repo_has_modules(str(source))


def _hub_repo_has_modules(name: str) -> bool:
    try:
        from huggingface_hub import constants, file_exists, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, MODULES_FILE), str):
            return True
        if constants.HF_HUB_OFFLINE:
            return False
        return bool(file_exists(name, MODULES_FILE))
    except Exception:  # an invalid repo id, no network, no such repo: not one we can tell is
        return False


# --------------------------------------------------------------------------- loading


def load_st_text(spec: str, source: str | Path, pooling: str | None = None, max_length: int = 64,
                 prefix: str | None = None, default_prefix: str = "") -> SentenceTransformerTower:
    """The text tower ``spec`` from a sentence-transformers folder or hub name ``source``.
    ``pooling``, if given, must be the model's own (a pack records it); ``max_length`` is cut
    to the model's ``max_seq_length``; the prompt is chosen as the module docstring says."""
    st = _sentence_transformer(spec, source)
    modules = list(st)
    transformer = modules[0] if modules else None
    _check_plain_text(spec, transformer)
    head = modules[1:]
    _check_head(spec, head)
    own_pooling = pooling_name(head)
    if pooling is not None and pooling != own_pooling:
        raise UsageError(f"text tower {spec!r}: it is a sentence-transformers model whose Pooling module "
                         f"pools by {own_pooling!r}; pooling {pooling!r} cannot be chosen for it")
    model = transformer.auto_model
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # never used (the Pooling module pools): keep it out of methods and fingerprints
    tokenizer = transformer.tokenizer
    if transformer.max_seq_length:
        max_length = min(max_length, int(transformer.max_seq_length))
    prefix = choose_prompt(st, prefix, default_prefix)
    prompt_length = _prompt_length(transformer, prefix) if prefix and _excludes_prompt(head) else None
    return SentenceTransformerTower(spec, model, tokenizer, head, pooling=own_pooling, max_length=max_length,
                                    prefix=prefix, prompt_length=prompt_length, truncate_dim=st.truncate_dim,
                                    width=_embedding_dimension(st), load_tokenizer=_reloader(spec, source, tokenizer))


def _embedding_dimension(st) -> int | None:
    get = getattr(st, "get_embedding_dimension", None) or getattr(st, "get_sentence_embedding_dimension", None)
    try:
        return int(get()) if callable(get) and get() is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def choose_prompt(st, prefix: str | None, default_prefix: str) -> str:
    """The prompt put before every caption: ``prefix``, else the model's default prompt, else its
    ``query`` prompt, else ``default_prefix``."""
    if prefix is not None:
        return prefix
    prompts = getattr(st, "prompts", None) or {}
    default_name = getattr(st, "default_prompt_name", None)
    if default_name is not None and isinstance(prompts.get(default_name), str):
        return prompts[default_name]
    if isinstance(prompts.get("query"), str):
        return prompts["query"]
    return default_prefix


def pooling_name(head: list[nn.Module]) -> str:
    """The Pooling module's mode(s), joined by ``+`` (``cls``, ``mean+max``)."""
    for module in head:
        if type(module).__name__ == "Pooling":
            mode = module.pooling_mode
            return mode if isinstance(mode, str) else "+".join(mode)
    return "none"


def _sentence_transformer(spec: str, source):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:  # a declared dependency; a broken install says so
        raise load_error(spec, "a sentence-transformers model", error) from error
    with quiet_transformers(), _quiet_sentence_transformers():
        try:
            return SentenceTransformer(str(source), device="cpu", trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise load_error(spec, "a sentence-transformers model", error) from error


def _check_plain_text(spec: str, transformer) -> None:
    """The first module must be a text encoder whose output is its last hidden state."""
    from sentence_transformers.base.modules import Transformer

    problem = None
    if not isinstance(transformer, Transformer):
        problem = f"its first module is {type(transformer).__name__}, not a Transformer"
    elif getattr(transformer, "modality_config", None) != PLAIN_TEXT_MODALITIES:
        problem = f"its Transformer is not a plain text encoder ({transformer.modality_config})"
    elif getattr(transformer, "module_output_name", "token_embeddings") != "token_embeddings":
        problem = f"its Transformer outputs {transformer.module_output_name}, not token embeddings"
    elif getattr(transformer, "transformer_task", "feature-extraction") != "feature-extraction":
        problem = f"its Transformer's task is {transformer.transformer_task}, not feature-extraction"
    elif getattr(transformer, "query_expansion", None) or (getattr(transformer, "processing_kwargs", None) or {}):
        problem = "its Transformer expands queries or sets its own processing arguments"
    elif transformer.tokenizer is None or not hasattr(transformer.auto_model, "config"):
        problem = "its Transformer has no tokenizer"
    if problem:
        raise TowerLoadError(f"text tower {spec!r}: this sentence-transformers model cannot be a text tower: "
                             f"{problem}")


def _check_head(spec: str, head: list[nn.Module]) -> None:
    unknown = [type(module).__name__ for module in head if type(module).__name__ not in HEAD_MODULES]
    poolings = [module for module in head if type(module).__name__ == "Pooling"]
    if unknown or len(poolings) != 1:
        why = f"modules {unknown}" if unknown else f"{len(poolings)} Pooling modules"
        raise TowerLoadError(f"text tower {spec!r}: this sentence-transformers model cannot be a text tower: "
                             f"it has {why}; after its Transformer the tower runs one Pooling and any of "
                             f"{', '.join(HEAD_MODULES)}")


def _excludes_prompt(head: list[nn.Module]) -> bool:
    return any(type(module).__name__ == "Pooling" and not module.include_prompt for module in head)


def _prompt_length(transformer, prompt: str) -> int | None:
    """The prompt's length in tokens as ``encode`` counts it (without a trailing special token)."""
    return transformer._get_prompt_length(prompt)


def _reloader(spec: str, source, tokenizer):
    """A loader of the same tokenizer, for ``TokenizerSlot``: from the Transformer's own folder,
    if what loads from there is the tokenizer sentence-transformers built (its ``do_lower_case``
    may change it); else None (the tokenizer stays in memory)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None

    modules_file = folder / MODULES_FILE  # absent: a plain transformers folder loaded with st:
    modules = json.loads(modules_file.read_text(encoding="utf-8")) if modules_file.is_file() else []
    path = folder / (modules[0].get("path", "") if modules else "")
    load = functools.partial(_hf_tokenizer, path, spec)
    try:
        with quiet_transformers():
            same = tokenizer_digest(load()) == tokenizer_digest(tokenizer)
    except Exception:
        return None
    return load if same else None


@contextlib.contextmanager
def _quiet_sentence_transformers() -> Iterator[None]:
    """sentence-transformers' info and warning logs off inside (they name folders mlilt names)."""
    logger = logging.getLogger("sentence_transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
