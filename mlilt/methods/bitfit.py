"""``bitfit``: train every bias of the tower (Ben Zaken et al., 2022)."""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import Scope, method
from mlilt.methods.inject import make_all_trainable


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    biases = [name for name, _ in tower.named_parameters()
              if name.rpartition(".")[2] in ("bias", "in_proj_bias") and scope(name)]
    return make_all_trainable(tower, biases)


METHOD = method("bitfit", apply)
