"""A pack as an open_clip model, so code written for open_clip (CLIP_benchmark included) runs on it.

    model, _, preprocess = mlilt.create_model_and_transforms("langpacks/sw")
    tokenizer = mlilt.get_tokenizer(model)
    image_features = model.encode_image(torch.stack([preprocess(im) for im in images]))
    text_features = model.encode_text(tokenizer(["mbwa anakimbia"]))

The model encodes in one language (the pack's, or ``lang=`` when several packs are loaded).
Tokens are the text tower's ids, padded to the batch's longest with its pad id: the attention
mask is ``tokens != pad_id``, so ``encode_text`` gives ``MliltModel.encode_text``'s embeddings.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from mlilt.api import MliltModel, load
from mlilt.errors import UsageError


class ClipModel(nn.Module):
    """open_clip's model interface over a loaded mlilt model, in one language."""

    def __init__(self, model: MliltModel, lang: str):
        super().__init__()
        if lang not in model.languages:
            raise UsageError(f"lang={lang!r}: loaded languages are {', '.join(model.languages)}")
        self.model, self.lang = model, lang
        self.logit_scale = nn.Parameter(torch.tensor(math.log(model.logit_scale)), requires_grad=False)
        self.pad_id = pad_id(model.texts[lang].tower)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embeddings of preprocessed pixels [N, 3, H, W] (always unit length, as packs give them)."""
        return self.model.image(image.to(self.model.image.proj.weight.device))

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embeddings of token ids [N, L] from ``get_tokenizer`` (always unit length)."""
        side = self.model.texts[self.lang]
        text = text.to(side.proj.weight.device)
        return side(text, (text != self.pad_id).long())

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(image_features, text_features, logit_scale.exp()), as open_clip's CLIP.forward."""
        image_features = F.normalize(self.encode_image(image), dim=-1) if image is not None else None
        text_features = F.normalize(self.encode_text(text), dim=-1) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


class Tokenizer:
    """Captions to the text tower's token ids [N, L] (its prefix and length limit applied)."""

    def __init__(self, model: MliltModel, lang: str):
        self.tower = model.texts[lang].tower
        self.pad_id = pad_id(self.tower)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tower.tokenize(texts)["input_ids"]


def pad_id(tower) -> int:
    pad = getattr(getattr(tower, "tokenizer", None), "pad_token_id", None)
    if pad is None:
        raise UsageError(f"text tower {tower.spec}: its tokenizer has no pad token, so token ids alone cannot "
                         f"say where a caption ends; use MliltModel.encode_text")
    return pad


def create_model_and_transforms(*packs: str | os.PathLike, lang: str | None = None, device: str = "cpu"):
    """(model, preprocess_train, preprocess_val) as ``open_clip.create_model_and_transforms``
    returns them; both transforms are the image tower's evaluation preprocessing."""
    model = load(*packs).to(device)
    chosen = _language(model, lang)
    preprocess = model.image.tower.preprocess
    return ClipModel(model, chosen).eval(), preprocess, preprocess


def get_tokenizer(*packs, lang: str | None = None) -> Tokenizer:
    """The tokenizer for ``ClipModel.encode_text`` (``open_clip.get_tokenizer``'s counterpart), of
    a ``ClipModel`` or of packs (loaded for their text sides only)."""
    if len(packs) == 1 and isinstance(packs[0], ClipModel):
        return Tokenizer(packs[0].model, packs[0].lang)
    model = load(*packs)
    return Tokenizer(model, _language(model, lang))


def _language(model: MliltModel, lang: str | None) -> str:
    if lang is None:
        if len(model.languages) != 1:
            raise UsageError(f"several languages are loaded ({', '.join(model.languages)}): pass lang=")
        return model.languages[0]
    return lang
