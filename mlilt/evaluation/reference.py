"""An already-aligned open_clip model as a reference, evaluated with the same code as packs.

``xlm-roberta-base-ViT-B-32:laion5b_s13b_b90k`` and the like: its own text and image towers
and its own embedding space, so the projections are the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from mlilt.modeling.model import SideEncoder, identity_side
from mlilt.towers.base import Tower
from mlilt.towers.open_clip_vision import create_open_clip, open_clip_visual_tower


class OpenClipTextTower(Tower):
    """open_clip's text encoder (``encode_text``) behind the text-tower interface."""

    side = "text"

    def __init__(self, spec: str, model: nn.Module, tokenizer):
        width = model.text_projection.shape[-1] if getattr(model, "text_projection", None) is not None \
            else model.visual.output_dim
        super().__init__(spec, width, {"family": "open_clip-text"})
        self.model = model
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(texts)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # open_clip pads itself

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def reference_sides(spec: str) -> tuple[SideEncoder, SideEncoder]:
    """(text, image) encoders of an open_clip model, with identity projections."""
    import open_clip

    model = create_open_clip(spec).eval()
    text_tower = OpenClipTextTower(spec, model, open_clip.get_tokenizer(spec.partition(":")[0])).freeze()
    image_tower = open_clip_visual_tower(spec, model).freeze()
    return identity_side(text_tower), identity_side(image_tower)

