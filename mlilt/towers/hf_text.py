"""Hugging Face text towers: any encoder ``AutoModel`` loads (XLM-R, mBERT, mE5, ...), from a
hub name or a saved folder, pooled to one vector per caption. A sentence-transformers model (a
folder with ``modules.json``, or a hub repository with one) loads through sentence-transformers
itself instead (``st_text.SentenceTransformerTower``).

The tower computes its last hidden state with the model's own forward. A ``TextRunner`` set
on it (``mlilt.speed.packed.PaddingFree``: the per-token layers on the real tokens only) may
compute it another way; the tower compares the two on its first batch and keeps the model's
own forward for good if they disagree.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from mlilt.errors import TowerLoadError
from mlilt.towers.base import Tower, load_error

# Config keys that name where or by which library version a model was saved: they do not
# change what it computes, so they stay out of the fingerprint.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype",
                        "_attn_implementation", "_attn_implementation_autoset", "_commit_hash"}
SELF_CHECK_TOLERANCE = 1e-4  # relative to the features' largest value; float noise is ~1e-6
TOWER_FILE = "mlilt_tower.json"  # written by mlilt into folders it converts (offline.me5_small_dir)
ST_CONFIG_FILE = "config_sentence_transformers.json"  # sentence-transformers' prompts


class Pooling(str, Enum):
    mean = "mean"
    cls = "cls"


class TokenizerSlot:
    """A tower's tokenizer, which it can hand back while it is not needed and load again on
    next use. XLM-R's 250,002-piece Unigram model takes ~250 MB in the Rust ``tokenizers``
    library; training tokenizes every caption once and then needs none of it. One slot is
    shared by a tower and its training copies, so handing it back frees it for all."""

    def __init__(self, tokenizer, load: Callable[[], Any] | None = None):
        self._tokenizer = tokenizer
        self._load = load  # None: cannot be loaded again (a tokenizer object given in Python)
        self.digest = tokenizer_digest(tokenizer)

    def get(self):
        if self._tokenizer is None:
            tokenizer = self._load()
            if tokenizer_digest(tokenizer) != self.digest:
                raise TowerLoadError("the text tower's tokenizer changed on disk since it was loaded; "
                                     "load the tower again")
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def held(self) -> bool:
        """Whether the tokenizer is in memory now."""
        return self._tokenizer is not None

    def hand_back(self) -> bool:
        """Drop the tokenizer until next use; False (kept) when it could not be loaded again."""
        if self._load is None or not self.held:
            return False
        self._tokenizer = None
        return True


class TextRunner(Protocol):
    """Another way to compute an encoder's last hidden state, equal to the model's own to float
    noise. Stateless: a tower and its copies share one."""

    def why_not(self, model: nn.Module) -> str | None:
        """None if this runner can run ``model``, else the reason."""

    def last_hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S, width], zeros (or anything) at padding positions: pooling masks them."""


class HFTextTower(Tower):
    """A frozen Hugging Face encoder plus its tokenizer, pooling and optional text prefix.
    ``load_tokenizer`` loads the same tokenizer again: with it, the tokenizer may be handed
    back while training runs (``TokenizerSlot``).

    With a ``runner`` (``use_runner``) the tower runs padding-free: the same features, with
    the per-token layers on the real tokens only. ``padding_free = False`` runs the model's
    own padded forward instead; ``packing_problem`` says why a tower runs padded."""

    side = "text"

    def __init__(self, spec: str, model, tokenizer, pooling: str = "mean", max_length: int = 64, prefix: str = "",
                 load_tokenizer: Callable[[], Any] | None = None, runner: TextRunner | None = None):
        pooling = self.checked_pooling(pooling)
        slot = TokenizerSlot(tokenizer, load_tokenizer)
        model_config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
        config = {"pooling": pooling, "max_length": max_length, "prefix": prefix, "model": model_config,
                  "tokenizer_sha256": slot.digest}
        super().__init__(spec, model.config.hidden_size, config)
        self.model = model
        self.tokenizer_slot = slot
        self.pooling = pooling
        self.max_length = max_length
        self.prefix = prefix
        self.padding_free = True  # False: the model's own padded forward even with a runner
        self.use_runner(runner)

    @staticmethod
    def checked_pooling(pooling: str) -> str:
        """``pooling`` as this tower stores it; a ValueError for one it cannot compute."""
        return Pooling(pooling).value

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The features of a batch from its last hidden state [B, S, width] (``pool``)."""
        return pool(hidden, attention_mask, self.pooling)

    def use_runner(self, runner: TextRunner | None) -> None:
        """Compute the last hidden state with ``runner`` (None: the model's own forward only)."""
        self.runner = runner
        self.packing_problem = "no padding-free runner is set" if runner is None else runner.why_not(self.model)
        self._packing_checked = False

    @property
    def tokenizer(self):
        return self.tokenizer_slot.get()

    def tokenize(self, texts: list[str], pad: bool = True) -> dict[str, torch.Tensor]:
        """Token ids padded to the longest text of this batch, never to a fixed length."""
        return self.tokenizer([self.prefix + text for text in texts], padding="longest" if pad else False,
                              truncation=True, max_length=self.max_length, return_tensors="pt" if pad else None)

    @property
    def runs_padding_free(self) -> bool:
        return self.padding_free and self.runner is not None and self.packing_problem is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.runs_padding_free:
            features = self.pool_hidden(self.runner.last_hidden(self.model, input_ids, attention_mask), attention_mask)
            if self._packing_checked or self._packing_agrees(features, input_ids, attention_mask):
                return features
        return self.pool_hidden(self._padded_last_hidden(input_ids, attention_mask), attention_mask)

    def _padded_last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _packing_agrees(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Once per tower: the runner's features must be the model's own, else it stays off."""
        self._packing_checked = True
        with torch.no_grad():
            reference = self.pool_hidden(self._padded_last_hidden(input_ids, attention_mask), attention_mask)
        difference = disagreement(features.detach(), reference)
        if difference is None:
            return True
        self.packing_problem = f"its packed forward differs from the model's own by {difference:.2g}"
        warnings.warn(f"text tower {self.spec}: padding-free forward turned off: {self.packing_problem}",
                      stacklevel=3)
        return False


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per caption: the first token's state (``cls``) or the mean over real tokens."""
    if pooling == Pooling.cls.value:
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def disagreement(candidate: torch.Tensor, reference: torch.Tensor) -> float | None:
    """None where two ways of computing the same features agree to float noise, else their
    largest difference (inf for another shape)."""
    if candidate.shape != reference.shape:
        return float("inf")
    if not reference.numel():
        return None
    difference = float((candidate.float() - reference.float()).abs().max())
    scale = float(reference.abs().max().clamp_min(1.0))
    return None if difference <= SELF_CHECK_TOLERANCE * scale else difference


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition: another vocabulary or normaliser changes
    every embedding, so it belongs in the tower's fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- loading


def folder_settings(folder: Path) -> dict:
    """Settings of a plain transformers folder: the query prompt of a
    ``config_sentence_transformers.json`` beside it, and the pooling and query prefix of the
    ``mlilt_tower.json`` of a folder mlilt converted. (A sentence-transformers folder, one with
    ``modules.json``, loads through ``st_text`` instead.)"""
    settings: dict = {}
    prompts = _json(folder / ST_CONFIG_FILE).get("prompts") or {}
    if isinstance(prompts.get("query"), str):
        settings["prefix"] = prompts["query"]
    own = _json(folder / TOWER_FILE)
    if isinstance(own.get("query_prefix"), str):
        settings["prefix"] = own["query_prefix"]
    if own.get("pooling") in (Pooling.mean.value, Pooling.cls.value):
        settings["pooling"] = own["pooling"]
    return settings


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_hf_text(spec: str, source: str | Path, pooling: str | None = None, max_length: int = 64,
                 prefix: str | None = None, default_prefix: str = "") -> HFTextTower:
    """The text tower ``spec`` from ``source``, a hub name or a folder. A sentence-transformers
    model (``st_text.is_sentence_transformers``) loads through sentence-transformers
    (``st_text.load_st_text``). Otherwise pooling and prefix come from the arguments, else the
    folder's own settings (``folder_settings``), else mean pooling and ``default_prefix``."""
    from mlilt.towers import st_text  # it builds on this module

    if st_text.is_sentence_transformers(source):
        return st_text.load_st_text(spec, source, pooling, max_length, prefix, default_prefix=default_prefix)
    settings = {"pooling": Pooling.mean.value, "max_length": max_length, "prefix": default_prefix}
    folder = Path(source).expanduser()
    if folder.is_dir():
        source = folder
        settings.update(folder_settings(folder))
    else:
        source = str(source)  # a hub name
    if pooling is not None:
        settings["pooling"] = pooling
    if prefix is not None:
        settings["prefix"] = prefix
    model, tokenizer = _hf_text_model(source, spec)
    return HFTextTower(spec, model, tokenizer, **settings, load_tokenizer=functools.partial(_hf_tokenizer, source, spec))


def _hf_tokenizer(source, spec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise load_error(spec, "a Hugging Face text model", error) from error


def _hf_text_model(source, spec):
    from transformers import AutoModel

    with quiet_transformers():
        tokenizer = _hf_tokenizer(source, spec)
        try:
            try:  # the pooler is never used (we pool the last hidden state): don't build it
                model = AutoModel.from_pretrained(str(source), trust_remote_code=False, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(str(source), trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise load_error(spec, "a Hugging Face text model", error) from error
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # keeps unused weights out of methods and fingerprints
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars (and huggingface_hub's) off inside, so
    that they do not bury mlilt's own messages; the caller's settings are restored after."""
    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its tqdm class

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = dict(hub_tqdm.progress_bar_states)
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():  # huggingface_hub warns when its environment variable decides
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_bars)
