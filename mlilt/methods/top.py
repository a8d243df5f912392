"""``top[:K]``: not a method of its own but a limit on the others (PEFT's ``layers_to_transform``):
``ln+adapter+top:4`` puts LayerNorm tuning and adapters only in the last 4 blocks of each
tower and the layers after them.

Why: when nothing below block L-K trains, the backward pass stops at block L-K and keeps no
activations below it.
"""
from __future__ import annotations

from torch import nn

from mlilt.errors import UsageError
from mlilt.methods.base import Scope
from mlilt.towers.layout import find_layout, last_blocks

RESTRICTABLE = ("ln", "bitfit", "adapter", "lora")  # unlock:K already is "the top K"; full is everything


def check_partners(part: str, partners: list[str]) -> None:
    """``top`` limits per-block methods; alone or beside a whole-block method it means nothing."""
    wrong = [name for name in partners if name not in RESTRICTABLE]
    if not partners or wrong:
        raise UsageError(f"method {part}: top limits {', '.join(RESTRICTABLE)} to the last blocks; "
                         f"it cannot be combined with {', '.join(wrong) or 'nothing'}")


def top_scope(tower: nn.Module, blocks: int, where: str) -> Scope:
    """Names in the last ``blocks`` blocks of ``tower`` or in the layers after them."""
    layout = find_layout(tower)
    if not layout.blocks:
        raise UsageError(f"top:{blocks}: the {where} has no block structure to count blocks in")
    kept = tuple(block + "." for block in last_blocks(layout, blocks, f"top:{blocks}", where))
    tail = set(layout.tail_params)  # parameter names (bitfit) ...
    tail_modules = {param.rpartition(".")[0] for param in tail}  # ... and their modules (ln)

    def scope(name: str) -> bool:
        return name.startswith(kept) or name in tail or name in tail_modules
    return scope
