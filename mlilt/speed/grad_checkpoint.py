"""Gradient checkpointing for any tower with a block layout: a block keeps only its inputs in
the forward pass and recomputes its activations when the backward pass reaches it. Less
memory for a trained tower (the activations of one block at a time), about one more forward
pass of compute.

Towers run in eval mode (no dropout, frozen BatchNorm statistics), where Hugging Face's own
``gradient_checkpointing_enable`` does nothing, so blocks are wrapped here instead. The
wrapper is set on the block's ``forward`` attribute of the training copy only: module and
parameter names (and so packs) stay as they are.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlilt.towers.layout import find_layout


CHECKPOINTED = "mlilt_checkpointed"  # set on every block checkpoint_blocks wrapped


def checkpoint_blocks(tower: nn.Module) -> int:
    """Checkpoint every block of ``tower``; returns how many were wrapped (0: no block layout).

    Blocks below the lowest trainable one record nothing for the backward pass anyway; the
    wrapper costs them nothing either, since ``checkpoint`` then keeps no inputs."""
    blocks = find_layout(tower).blocks
    for name in blocks:
        block = tower.get_submodule(name)
        block.forward = checkpointed(block.forward)
        setattr(block, CHECKPOINTED, True)  # for code that runs the block's parts itself (speed/packed.py)
    return len(blocks)


def is_checkpointed(block: nn.Module) -> bool:
    """Whether ``checkpoint_blocks`` wrapped this block."""
    return getattr(block, CHECKPOINTED, False)


def checkpointed(forward: Callable) -> Callable:
    """``forward`` that keeps only its inputs and recomputes the rest in the backward pass."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and the frozen prefix: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
