"""What a method is: its catalog entry plus a function that changes a tower copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mlilt.methods.catalog import CATALOG, MethodInfo


@dataclass(frozen=True)
class MethodDef(MethodInfo):
    apply: Callable[[nn.Module, int | None], int] = None  # returns the number of targets it found


def method(name: str, apply: Callable[[nn.Module, int | None], int]) -> MethodDef:
    """The registered method ``name``: its catalog entry with ``apply`` attached."""
    return MethodDef(**vars(CATALOG[name]), apply=apply)
