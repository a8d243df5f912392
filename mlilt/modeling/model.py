"""Towers + methods + projections: the contrastive model one pack trains, and the
multilingual model that serves several packs over one copy of the frozen towers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlilt.towers.base import Tower

TEMPERATURE_INIT = 0.07
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on 1/temperature


class SideEncoder(nn.Module):
    """A tower copy (method applied) and its linear projection into the shared space."""

    def __init__(self, tower: Tower, embed_dim: int, base: Tower):
        super().__init__()
        self.tower = tower
        self.proj = nn.Linear(tower.width, embed_dim, bias=False)
        # The frozen weights this copy shares with the loaded tower: never saved in a pack.
        self._shared_ids = frozenset(id(p) for p in base.parameters())
        self.base_fingerprint = base.fingerprint()  # what a pack records and checks

    @property
    def side(self) -> str:
        return self.tower.side

    def tower_trains(self) -> bool:
        return any(p.requires_grad for p in self.tower.parameters())

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features.to(self.proj.weight.dtype)), dim=-1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.project(self.tower(*inputs))

    def own_state(self) -> dict[str, torch.Tensor]:
        """Tensors this side adds or replaces (method parameters, projection): a pack's content."""
        return {name: p for name, p in self.named_parameters() if id(p) not in self._shared_ids}

    def freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)


def identity_side(tower: Tower) -> SideEncoder:
    """A frozen side whose projection is the identity: the space of a tower already aligned
    (an open_clip model's), kept exactly (``x @ I`` is ``x`` bit for bit in float32)."""
    encoder = SideEncoder(tower, tower.width, base=tower)
    with torch.no_grad():
        encoder.proj.weight.copy_(torch.eye(tower.width))
    encoder.freeze()
    return encoder


class ContrastiveModel(nn.Module):
    """What one training run optimises: a text side, an image side and a temperature."""

    def __init__(self, text: SideEncoder, image: SideEncoder):
        super().__init__()
        self.text = text
        self.image = image
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / TEMPERATURE_INIT)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def pack_state(self) -> dict[str, torch.Tensor]:
        """Every tensor a pack stores, by its name in the pack file. The image side is stored
        even when it came frozen from an anchor: a pack carries the image space it lives in."""
        state = {f"text.{k}": v for k, v in self.text.own_state().items()}
        state.update({f"image.{k}": v for k, v in self.image.own_state().items()})
        state["logit_scale"] = self.logit_scale
        return state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: the i-th caption goes with the i-th image."""
    logits = scale * text @ image.t()
    targets = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
