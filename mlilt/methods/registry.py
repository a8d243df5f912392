"""The method registry and the one function that applies a method spec to both towers."""
from __future__ import annotations

from dataclasses import dataclass, field

from mlilt.errors import UsageError
from mlilt.methods import adapter, bitfit, full, ln, lora, unlock
from mlilt.methods.base import MethodDef, Scope, everywhere
from mlilt.methods.catalog import CATALOG
from mlilt.methods.spec import MethodPart, parse_method
from mlilt.methods.top import check_partners, top_scope
from mlilt.towers.base import Tower

METHODS: dict[str, MethodDef] = {m.name: m for m in (
    ln.METHOD, bitfit.METHOD, adapter.METHOD, lora.METHOD, unlock.METHOD, full.HEAD, full.FULL_TEXT, full.FULL)}
_TRAINERS = {name for name, info in CATALOG.items() if not info.modifier}
if set(METHODS) != _TRAINERS:  # a catalog entry without code (or the reverse) is a packaging bug
    raise ImportError(f"methods and catalog disagree: {sorted(set(METHODS) ^ _TRAINERS)}")


@dataclass
class MethodRow:
    part: str
    side: str
    found: int
    kind: str


@dataclass
class MethodReport:
    """What each method part matched in each tower, and what trains per tower."""

    method: str
    rows: list[MethodRow] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)  # side -> trainable tower params
    total: dict[str, int] = field(default_factory=dict)  # side -> all tower params
    notes: list[str] = field(default_factory=list)

    def percent(self, side: str) -> float:
        return 100.0 * self.trainable.get(side, 0) / max(1, self.total.get(side, 1))

    def trains_side(self, side: str) -> bool:
        return self.trainable.get(side, 0) > 0

    def to_dict(self) -> dict:
        return {"method": self.method, "notes": self.notes,
                "matched": [vars(row) for row in self.rows],
                "towers": {side: {"trainable": self.trainable[side], "total": self.total[side],
                                  "percent": round(self.percent(side), 4)} for side in self.total}}


def apply_methods(spec: str, towers: dict[str, Tower], frozen_sides: tuple[str, ...] = (),
                  strict: bool = True) -> MethodReport:
    """Apply ``spec`` to tower copies in ``towers`` (side -> tower), in place.

    ``towers`` may hold one side only: parts for the other side are then skipped.
    ``strict=False`` (rebuilding a saved pack, one side at a time) only records what matched.

    Sides in ``frozen_sides`` (the image side when training against an anchor) are left alone;
    naming one of them explicitly is an error, as is a part that finds nothing anywhere or
    nothing on a side it was explicitly asked for.
    """
    report = MethodReport(spec)
    parts = parse_method(spec)
    trainers = [part for part in parts if not CATALOG[part.name].modifier]
    scopes = _scopes([part for part in parts if CATALOG[part.name].modifier], trainers, towers, frozen_sides, report)
    for part in trainers:
        _apply_part(part, towers, frozen_sides, report, strict, scopes)
    report.notes += _mixed_side_notes(parts, towers, frozen_sides)
    for side, tower in towers.items():
        report.total[side] = sum(p.numel() for p in tower.parameters())
        report.trainable[side] = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    return report


def _mixed_side_notes(parts: list[MethodPart], towers: dict, frozen_sides) -> list[str]:
    """``ln+adapter@text`` reads like "both on text" but ``@`` binds to one part: say so."""
    named = {part.side for part in parts if part.side}
    if len(named) != 1:
        return []
    side = named.pop()
    others = {s for s in towers if s != side and s not in frozen_sides}
    unsided = [part for part in parts if not part.side and not CATALOG[part.name].modifier
               and others & set(CATALOG[part.name].sides)]
    if not unsided:
        return []
    meant = "+".join(str(part) if part.side else f"{part}@{side}" for part in parts)
    return [f"'@{side}' restricts only the part it is attached to: {', '.join(map(str, unsided))} also "
            f"{'acts' if len(unsided) == 1 else 'act'} on "
            f"the {'/'.join(sorted(others))} tower; for the {side} tower only, write {meant}"]


def _scopes(modifiers: list[MethodPart], trainers: list[MethodPart], towers: dict[str, Tower], frozen_sides,
            report: MethodReport) -> dict[str, Scope]:
    """Where the trainers may act on each side: everywhere, or within a ``top:K`` limit."""
    scopes: dict[str, Scope] = {}
    trained_sides = {s for t in trainers for s in _sides(t, frozen_sides)}
    for part in modifiers:  # only top:K so far
        check_partners(str(part), [t.name for t in trainers])
        for side in [s for s in _sides(part, frozen_sides) if s in towers and s in trained_sides]:
            if side in scopes:
                raise UsageError(f"method {part}: the {side} tower is given two top limits")
            blocks = part.arg if part.arg is not None else CATALOG[part.name].default_arg
            scopes[side] = top_scope(towers[side], blocks, f"{side} tower ({towers[side].spec})")
            report.rows.append(MethodRow(str(part), side, blocks, CATALOG[part.name].target_kind))
    return scopes


def _sides(part: MethodPart, frozen_sides) -> list[str]:
    """The sides a part acts on: its own @side, or every side it knows that is not frozen."""
    if part.side in frozen_sides:
        raise UsageError(f"method {part}: the {part.side} side is frozen (training against an anchor "
                         f"trains the text side only)")
    return [part.side] if part.side else [s for s in CATALOG[part.name].sides if s not in frozen_sides]


def _apply_part(part: MethodPart, towers: dict[str, Tower], frozen_sides, report: MethodReport,
                strict: bool, scopes: dict[str, Scope]) -> None:
    method = METHODS[part.name]
    sides = _sides(part, frozen_sides)
    if not set(sides) <= set(towers):  # applying to a subset of towers (an anchor's image side)
        sides = [s for s in sides if s in towers]
        if not sides:
            return
    found_anywhere = 0
    for side in sides:
        found = method.apply(towers[side], part.arg if part.arg is not None else method.default_arg,
                             scopes.get(side, everywhere), **dict(part.options))  # options: lora's only
        report.rows.append(MethodRow(str(part), side, found, method.target_kind))
        found_anywhere += found
        if found == 0 and method.sides:
            if part.side and strict:
                raise UsageError(f"method {part}: found no {method.target_kind} in the {side} tower "
                                 f"({towers[side].spec})")
            report.notes.append(f"{part.name}: no {method.target_kind} in the {side} tower ({towers[side].spec})")
    if strict and method.sides and sides and found_anywhere == 0:
        raise UsageError(f"method {part}: found no {method.target_kind} in any tower "
                         f"({', '.join(towers[s].spec for s in sides)})")
    if strict and method.sides and not sides:
        raise UsageError(f"method {part}: acts only on the {'/'.join(method.sides)} side, which is frozen here")
