"""Method specs as users write them: ``ln+adapter``, ``lora:4@text``, ``unlock:2+ln@image``.

Parts are joined with ``+``; each is ``NAME[:ARG][@SIDE]`` where ARG is the method's one
number (adapter reduction factor, LoRA rank, unlocked blocks) and SIDE (``text`` or
``image``) restricts it to one tower — a side named explicitly must have targets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlilt.errors import UsageError
from mlilt.methods.catalog import CATALOG

SIDES = ("text", "image")
_PART = re.compile(r"^(?P<name>[a-z][a-z-]*)(?::(?P<arg>\d+))?(?:@(?P<side>[a-z]+))?$")


@dataclass(frozen=True)
class MethodPart:
    name: str
    arg: int | None = None
    side: str | None = None

    def __str__(self) -> str:
        text = self.name + (f":{self.arg}" if self.arg is not None else "")
        return text + (f"@{self.side}" if self.side else "")


def parse_method(spec: str) -> list[MethodPart]:
    parts = []
    for raw in spec.replace(" ", "").split("+"):
        match = _PART.match(raw)
        if not match:
            raise UsageError(f"method {spec!r}: cannot read {raw!r}; expected NAME[:N][@text|@image], "
                             f"e.g. ln+adapter, lora:8@text, unlock:2")
        name, arg, side = match["name"], match["arg"], match["side"]
        if name not in CATALOG:
            raise UsageError(f"method {spec!r}: unknown method {name!r}; known: {', '.join(CATALOG)}")
        if side is not None and side not in SIDES:
            raise UsageError(f"method {spec!r}: side must be text or image, not {side!r}")
        parts.append(MethodPart(name, int(arg) if arg is not None else None, side))
    if len({(p.name, p.side) for p in parts}) != len(parts):
        raise UsageError(f"method {spec!r}: a method is listed twice")
    return parts
