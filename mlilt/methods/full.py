"""The baselines: ``full-text`` (LiT: the text tower trains, the image tower is locked) and
``full`` (both towers train), and ``head`` (only projections and temperature train)."""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import Scope, method
from mlilt.methods.inject import make_all_trainable


def train_everything(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    return make_all_trainable(tower)


def train_nothing(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    return 0


FULL_TEXT = method("full-text", train_everything)
FULL = method("full", train_everything)
HEAD = method("head", train_nothing)
