"""``lora[:R]``: low-rank updates W + (alpha/R)·B·A of the attention projection weights.

Attached as a weight parametrisation, so it works the same whether the weight belongs to a
Linear (BERT, ViT) or to a fused ``nn.MultiheadAttention`` (open_clip).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from mlilt.methods.base import Scope, method
from mlilt.methods.catalog import CATALOG
from mlilt.towers.layout import find_layout

DEFAULT_RANK = CATALOG["lora"].default_arg
ALPHA_PER_RANK = 2.0  # alpha = 2·rank, the common LoRA setting


class LoRADelta(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: starts as the base weight
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = ALPHA_PER_RANK

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    rank = arg or DEFAULT_RANK
    targets = [(module, param) for module, param in find_layout(tower).lora_weights if scope(module)]
    for module_name, param_name in targets:
        module = tower.get_submodule(module_name)
        out_features, in_features = getattr(module, param_name).shape
        delta = LoRADelta(out_features, in_features, rank).to(getattr(module, param_name).dtype)
        parametrize.register_parametrization(module, param_name, delta, unsafe=True)
    return len(targets)


METHOD = method("lora", apply)
