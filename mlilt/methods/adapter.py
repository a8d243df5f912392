"""``adapter[:R]``: bottleneck adapters (d -> d/R -> d, GELU, residual), two per block.

Placed as LilT places them: on the output of the attention sub-block and of the
feed-forward sub-block, before the residual add (and so before BERT's post-LayerNorm).
"""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import Scope, method
from mlilt.methods.catalog import CATALOG
from mlilt.methods.inject import output_width, replace_module
from mlilt.towers.layout import find_layout

DEFAULT_REDUCTION = CATALOG["adapter"].default_arg  # LilT: d -> d/4 -> d


class Adapter(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.down = nn.Linear(width, max(1, width // reduction))
        self.act = nn.GELU()
        self.up = nn.Linear(max(1, width // reduction), width)
        # Start as the identity so training begins from the pretrained tower's behaviour.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class AdaptedOutput(nn.Module):
    """Wraps a sub-block's output layer (kept as ``base_layer``) with an adapter after it."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base_layer(*args, **kwargs))


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    reduction = arg or DEFAULT_REDUCTION
    sites = [site for site in find_layout(tower).adapter_sites if scope(site)]
    for site in sites:
        width = output_width(tower, site)
        adapter = Adapter(width, reduction).to(next(tower.parameters()).dtype)
        replace_module(tower, site, AdaptedOutput(tower.get_submodule(site), adapter))
    return len(sites)


METHOD = method("adapter", apply)
