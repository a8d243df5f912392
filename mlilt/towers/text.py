"""Text towers: any Hugging Face encoder (XLM-R, mBERT, mE5, ...) or sentence-transformers
folder, pooled to one vector per caption."""
from __future__ import annotations

import hashlib
import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch

from mlilt.errors import TowerLoadError
from mlilt.towers.base import Tower
from mlilt.speed.packed import disagreement, packed_last_hidden, why_not_packable

# Config keys that name where or by which library version a model was saved: they do not
# change what it computes, so they stay out of the fingerprint.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype",
                        "_attn_implementation", "_attn_implementation_autoset", "_commit_hash"}


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


class HFTextTower(Tower):
    """A frozen Hugging Face encoder plus its tokenizer, pooling and optional text prefix.
    ``load_tokenizer`` loads the same tokenizer again: with it, the tokenizer may be handed
    back while training runs (``TokenizerSlot``).

    A BERT-family encoder runs padding-free (``towers/packed.py``): the same features, with
    the per-token layers on the real tokens only. ``padding_free = False`` runs the model's
    own padded forward instead; ``packing_problem`` says why a tower runs padded."""

    side = "text"

    def __init__(self, spec: str, model, tokenizer, pooling: str = "mean", max_length: int = 64, prefix: str = "",
                 load_tokenizer: Callable[[], Any] | None = None):
        pooling = Pooling(pooling).value
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
        # Per-token layers on the real tokens only (towers/packed.py); set False to run the
        # model's own padded forward. ``packing_problem`` says why a tower cannot.
        self.padding_free = True
        self.packing_problem = why_not_packable(model)
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
        return self.padding_free and self.packing_problem is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.count += 1
        if self.runs_padding_free:
            features = pool(packed_last_hidden(self.model, input_ids, attention_mask), attention_mask, self.pooling)
            if self._packing_checked or self._packing_agrees(features, input_ids, attention_mask):
                return features
        return pool(self._padded_last_hidden(input_ids, attention_mask), attention_mask, self.pooling)

    def _padded_last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _packing_agrees(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Once per tower: the packed features must be the model's own, else packing stays off."""
        self._packing_checked = True
        with torch.no_grad():
            reference = pool(self._padded_last_hidden(input_ids, attention_mask), attention_mask, self.pooling)
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


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition: another vocabulary or normaliser changes
    every embedding, so it belongs in the tower's fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sentence_transformers_layout(folder: Path) -> tuple[Path, dict] | None:
    """(transformer folder, settings) of a sentence-transformers folder, or None if it is not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    settings: dict = {}
    transformer = folder
    for module in modules:
        path = folder / module.get("path", "")
        kind = module.get("type", "")
        if kind.endswith("Transformer"):
            transformer = path
            st_config = path / "sentence_bert_config.json"
            if st_config.is_file():
                settings["max_length"] = json.loads(st_config.read_text()).get("max_seq_length")
        elif kind.endswith("Pooling") and (path / "config.json").is_file():
            pooling = json.loads((path / "config.json").read_text())
            settings["pooling"] = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    return transformer, {k: v for k, v in settings.items() if v is not None}
