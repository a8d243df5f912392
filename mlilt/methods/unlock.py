"""``unlock[:K]``: train the last K blocks of the tower and every layer after them."""
from __future__ import annotations

from torch import nn

from mlilt.errors import UsageError
from mlilt.methods.base import Scope, method
from mlilt.methods.inject import make_all_trainable
from mlilt.towers.layout import find_layout


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    blocks_to_unlock = arg or 1
    layout = find_layout(tower)
    if not layout.blocks:
        return 0
    if blocks_to_unlock > len(layout.blocks):
        raise UsageError(f"unlock:{blocks_to_unlock}: the {getattr(tower, 'side', '')} tower has only "
                         f"{len(layout.blocks)} blocks")
    unlocked = layout.blocks[-blocks_to_unlock:]
    names = [name for name, _ in tower.named_parameters() if any(name.startswith(b + ".") for b in unlocked)]
    make_all_trainable(tower, names + layout.tail_params)
    return len(unlocked)


METHOD = method("unlock", apply)
