"""Frozen means cached, for casts too: frozen linear weights keep a bfloat16 copy under --bf16.

Autocast casts a weight to bfloat16 at every call and keeps the cast only for weights that
require a gradient, so a frozen 12-layer text tower is cast again in every forward pass of
every step. A frozen weight never changes: cast it once. Under autocast the result is the same tensor
autocast would have made; outside autocast (validation, evaluation) the layer runs as before.
Set on a training copy's ``forward`` attribute, like the other wrappers: names and packs stay.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def cache_bf16_weights(tower: nn.Module) -> int:
    """Frozen ``nn.Linear`` layers of ``tower`` reuse one bfloat16 cast of their weight; how many."""
    frozen = [m for m in tower.modules()
              if type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters(recurse=False))]
    for linear in frozen:
        linear.forward = _cached_cast(linear, linear.forward)
    return len(frozen)


def _cached_cast(linear: nn.Linear, forward: Callable) -> Callable:
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != torch.bfloat16:
            return forward(x)
        if x.device not in cache:  # parameters are frozen: the cast never goes stale
            bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
            cache[x.device] = (linear.weight.detach().to(torch.bfloat16), bias)
        weight, bias = cache[x.device]
        return F.linear(x.to(torch.bfloat16), weight, bias)
    return run
