"""Method specs as users write them: ``ln+adapter``, ``lora:4@text``, ``unlock:2+ln@image``.

Parts are joined with ``+``; each is ``NAME[:ARG][:KEY=VALUE...][@SIDE]`` where ARG is the
method's one number (adapter reduction factor, LoRA rank, unlocked blocks), KEY=VALUE are
the options a method declares in its catalog entry (LoRA's ``alpha``, ``dropout`` and
``targets``: ``lora:8:alpha=16:dropout=0.1:targets=query-value``) and SIDE (``text`` or
``image``) restricts it to one tower — a side named explicitly must have targets.

Options are joined with ``:``, not ``,``: method lists are comma-separated on command lines
(``--methods ln,lora``), and a spec becomes part of a study cell's file name (``:`` -> ``~``),
so an option never holds ``,``, ``/``, ``_`` or ``~``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlilt.errors import UsageError
from mlilt.methods.catalog import CATALOG, OPTION_CHECKS

SIDES = ("text", "image")
_PART = re.compile(r"^(?P<name>[a-z][a-z-]*)(?::(?P<arg>\d+))?(?P<options>(?::[a-z]+=[a-z0-9.-]+)*)"
                   r"(?:@(?P<side>[a-z]+))?$")


@dataclass(frozen=True)
class MethodPart:
    name: str
    arg: int | None = None
    side: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # (key, value) as written, checked by the catalog

    def __str__(self) -> str:
        text = self.name + (f":{self.arg}" if self.arg is not None else "")
        text += "".join(f":{key}={value}" for key, value in self.options)
        return text + (f"@{self.side}" if self.side else "")


def parse_method(spec: str) -> list[MethodPart]:
    parts = []
    for raw in spec.replace(" ", "").split("+"):
        match = _PART.match(raw)
        if not match and "," in raw and "=" in raw:
            raise UsageError(f"method {spec!r}: cannot read {raw!r}; options are joined with ':', "
                             f"e.g. lora:8:alpha=16:dropout=0.1")
        if not match:
            raise UsageError(f"method {spec!r}: cannot read {raw!r}; expected NAME[:N][:KEY=VALUE...][@text|@image], "
                             f"e.g. ln+adapter, lora:8@text, lora:8:alpha=16, unlock:2")
        name, arg, side = match["name"], match["arg"], match["side"]
        if name not in CATALOG:
            raise UsageError(f"method {spec!r}: unknown method {name!r}; known: {', '.join(CATALOG)}")
        if side is not None and side not in SIDES:
            raise UsageError(f"method {spec!r}: side must be text or image, not {side!r}")
        options = _options(spec, name, match["options"])
        parts.append(MethodPart(name, int(arg) if arg is not None else None, side, options))
    if len({(p.name, p.side) for p in parts}) != len(parts):
        raise UsageError(f"method {spec!r}: a method is listed twice")
    return parts


def _options(spec: str, name: str, written: str) -> tuple[tuple[str, str], ...]:
    """``:key=value`` items of one part, each known to the method and its value readable."""
    known = CATALOG[name].options
    options = tuple(tuple(item.split("=", 1)) for item in written.split(":") if item)
    for key, value in options:
        if key not in known:
            accepted = f"its options are {', '.join(known)}" if known else "it takes no options"
            raise UsageError(f"method {spec!r}: {name} has no option {key!r}; {accepted}")
        problem = OPTION_CHECKS[name][key](value)
        if problem:
            raise UsageError(f"method {spec!r}: {name}:{key}={value}: {problem}")
    keys = [key for key, _ in options]
    if len(set(keys)) != len(keys):
        raise UsageError(f"method {spec!r}: an option of {name} is given twice")
    return options
