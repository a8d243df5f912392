"""What a method is: a name, the sides it touches, and a function that changes a tower copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlilt.towers.base import Tower


@dataclass(frozen=True)
class MethodDef:
    name: str
    sides: tuple[str, ...]  # the towers it acts on when no @side is given
    summary: str
    apply: Callable[[Tower, int | None], int]  # returns the number of targets it found
    arg_name: str | None = None
    default_arg: int | None = None
    target_kind: str = "targets"
