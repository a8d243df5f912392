"""The baselines: ``full-text`` (LiT: the text tower trains, the image tower is locked) and
``full`` (both towers train), and ``head`` (only projections and temperature train)."""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import MethodDef
from mlilt.methods.inject import make_all_trainable


def train_everything(tower: nn.Module, arg: int | None) -> int:
    return make_all_trainable(tower)


def train_nothing(tower: nn.Module, arg: int | None) -> int:
    return 0


FULL_TEXT = MethodDef("full-text", ("text",), "the whole text tower (LiT baseline)", train_everything,
                      target_kind="weights")
FULL = MethodDef("full", ("text", "image"), "both towers entirely (full fine-tuning baseline)", train_everything,
                 target_kind="weights")
HEAD = MethodDef("head", (), "nothing in the towers: projections and temperature only", train_nothing)
