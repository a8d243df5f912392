"""``unlock[:K]``: train the last K blocks of the tower and every layer after them."""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import Scope, method
from mlilt.methods.inject import make_all_trainable
from mlilt.towers.layout import find_layout, last_blocks


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    blocks_to_unlock = arg or 1
    layout = find_layout(tower)
    if not layout.blocks:
        return 0
    where = f"{getattr(tower, 'side', '')} tower"
    unlocked = last_blocks(layout, blocks_to_unlock, f"unlock:{blocks_to_unlock}", where)
    names = [name for name, _ in tower.named_parameters() if any(name.startswith(b + ".") for b in unlocked)]
    make_all_trainable(tower, names + layout.tail_params)
    return len(unlocked)


METHOD = method("unlock", apply)
