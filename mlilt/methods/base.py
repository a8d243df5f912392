"""What a method is: its catalog entry plus a function that changes a tower copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mlilt.methods.catalog import CATALOG, MethodInfo

Scope = Callable[[str], bool]  # does a module or parameter name lie where the method may act?
Apply = Callable[[nn.Module, int | None, Scope], int]  # returns the number of targets it found


def everywhere(name: str) -> bool:
    return True


@dataclass(frozen=True)
class MethodDef(MethodInfo):
    apply: Apply = None


def method(name: str, apply: Apply) -> MethodDef:
    """The registered method ``name``: its catalog entry with ``apply`` attached."""
    return MethodDef(**vars(CATALOG[name]), apply=apply)
