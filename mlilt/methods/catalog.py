"""What each method is, without the code that applies it: names, sides, one-line summaries.

Kept free of torch so that parsing a method spec and printing --help cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    sides: tuple[str, ...]  # the towers it acts on when no @side is given
    summary: str
    arg_name: str | None = None
    default_arg: int | None = None
    target_kind: str = "targets"
    modifier: bool = False  # changes where the other parts act instead of training anything itself
    options: tuple[str, ...] = ()  # KEY of ``NAME:KEY=VALUE`` options; OPTION_CHECKS reads their values


CATALOG: dict[str, MethodInfo] = {info.name: info for info in (
    MethodInfo("ln", ("text", "image"), "normalisation layers' scale and shift (LayerNorm, BatchNorm, GroupNorm)",
               target_kind="norm layers"),
    MethodInfo("bitfit", ("text", "image"), "all bias terms", target_kind="biases"),
    MethodInfo("adapter", ("text", "image"),
               "bottleneck adapters after attention and feed-forward outputs (transformer towers)",
               arg_name="reduction factor", default_arg=4, target_kind="adapter sites"),
    MethodInfo("lora", ("text", "image"), "low-rank updates of the attention projections (transformer towers), "
               "through PEFT; options :alpha=A (default 2·rank) :dropout=P (default 0) "
               ":targets=ROLE-ROLE (query key value qkv output up down; default query-value, or the fused "
               "qkv weight), e.g. lora:8:alpha=16:dropout=0.1:targets=query-key-value",
               arg_name="rank", default_arg=8, target_kind="attention weights",
               options=("alpha", "dropout", "targets")),
    MethodInfo("unlock", ("text", "image"), "the last K blocks and the layers after them", arg_name="blocks",
               default_arg=1, target_kind="blocks"),
    MethodInfo("top", ("text", "image"), "limits the other parts to the last K blocks and the layers after them "
               "(default 4); the frozen blocks below then run once per caption (text prefix cache)",
               arg_name="blocks", default_arg=4, target_kind="blocks", modifier=True),
    MethodInfo("head", (), "nothing in the towers: projections and temperature only"),
    MethodInfo("full-text", ("text",), "the whole text tower (LiT baseline)", target_kind="weights"),
    MethodInfo("full", ("text", "image"), "both towers entirely (full fine-tuning baseline)", target_kind="weights"),
)}


# What LoRA's ``targets`` option may name, per block: the attention projections (``qkv``: all
# three, as one fused weight where the tower keeps one), the attention output and the
# feed-forward layers. mlilt.methods.lora maps them onto each tower family's modules.
LORA_TARGET_ROLES = ("query", "key", "value", "qkv", "output", "up", "down")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _check_alpha(value: str) -> str | None:
    number = _number(value)
    return None if number is not None and 0 < number < float("inf") else "alpha must be a positive number"


def _check_dropout(value: str) -> str | None:
    number = _number(value)
    return None if number is not None and 0 <= number < 1 else "dropout must be a number in [0, 1)"


def _check_targets(value: str) -> str | None:
    roles = value.split("-")
    unknown = [role for role in roles if role not in LORA_TARGET_ROLES]
    if unknown or len(set(roles)) != len(roles):
        return (f"targets are roles joined with '-', each once, from {', '.join(LORA_TARGET_ROLES)}"
                + (f" (not {', '.join(map(repr, unknown))})" if unknown else ""))
    return None


# method -> option -> a check of its value (an error message, or None when it reads)
OPTION_CHECKS = {"lora": {"alpha": _check_alpha, "dropout": _check_dropout, "targets": _check_targets}}


def describe_methods() -> str:
    """One line per method with the sides it touches, for --help."""
    lines = []
    for method in CATALOG.values():
        arg = f"[:{method.arg_name.split()[0].upper()}]" if method.arg_name else ""
        sides = "+".join(method.sides) if method.sides else "projections only"
        lines.append(f"{method.name}{arg} ({sides}): {method.summary}")
    return "\n".join(lines)
