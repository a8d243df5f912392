"""The report's claims table: each of LilT's claims, the number from the study that answers it,
its spread over seeds, and a verdict given by one stated rule.

Every quantity is computed per seed first (the mean over the claim's languages and budgets
within that seed), so its spread is the spread over seeds. A claim compares a method with a
reference (the study's baseline, or a fraction of it); the difference d is judged against the
pooled standard deviation s of the two (``RULE``).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

from mlilt.defaults import DEFAULT_METHOD
from mlilt.methods.spec import parse_method
from mlilt.studies.config import StudyConfig
from mlilt.studies.results import Stat, markdown_table, own_language, stat

MR = "mean_recall"
RULE = ("d = method − reference, s = the pooled standard deviation over seeds, √((s₁² + s₂²) / 2). "
        "A claim that the method is **better**: *supported* when d > s, *not supported* when d < −s, *within "
        "noise* otherwise. A claim that the method **matches** (reaches) the reference: *supported* when "
        "d ≥ −s, *not supported* when d < −s. With fewer than two seeds on either side there is no spread: "
        "*within noise (one seed)*, never supported.")


@dataclass(frozen=True)
class Verdict:
    word: str  # supported / not supported / within noise / within noise (one seed)
    difference: float
    pooled_std: float | None


def judge(mine: Stat, reference: Stat, kind: str) -> Verdict:
    """``RULE`` applied to a method's and a reference's per-seed statistics; kind: better / matches."""
    d = mine.mean - reference.mean
    if mine.std is None or reference.std is None:
        return Verdict("within noise (one seed)", d, None)
    s = math.sqrt((mine.std ** 2 + reference.std ** 2) / 2)
    if d < -s:
        return Verdict("not supported", d, s)
    if kind == "matches" or d > s:
        return Verdict("supported", d, s)
    return Verdict("within noise", d, s)


@dataclass(frozen=True)
class Claim:
    claim: str
    method: str | None
    reference: str  # what the method is compared with, in words
    mine: Stat | None
    theirs: Stat | None
    kind: str  # better / matches
    where: str  # the cells the numbers average over
    missing: str = ""  # why the study cannot answer the claim

    def row(self) -> list[str]:
        if self.mine is None or self.theirs is None:
            return [self.claim, "–", "–", "–", f"not measured: {self.missing}"]
        verdict = judge(self.mine, self.theirs, self.kind)
        spread = "no spread (one seed)" if verdict.pooled_std is None else f"s = {verdict.pooled_std:.1f}"
        ratio = f" ({self.mine.mean / self.theirs.mean:.2f}×)" if self.theirs.mean > 0 else ""
        return [self.claim, f"`{self.method}` {self.mine} vs {self.reference} {self.theirs}; {self.where}",
                f"d = {verdict.difference:+.1f}{ratio}", spread, f"**{verdict.word}**"]


def per_seed(rows: list[dict], value: Callable[[dict], float | None], keep: Callable[[dict], bool]) -> Stat | None:
    """The mean of ``value`` over the kept rows of each seed, then their mean ± std over seeds.

    Only seeds that have every cell any seed has count (a study still running has whole seeds
    and a part of the next): a seed's mean is then always over the same cells."""
    by_seed: dict[int, dict[tuple, float]] = {}
    for row in rows:
        if keep(row) and value(row) is not None:
            by_seed.setdefault(row["seed"], {})[_cell_key(row)] = float(value(row))
    cells = set().union(*(values.keys() for values in by_seed.values())) if by_seed else set()
    whole = [values for _seed, values in sorted(by_seed.items()) if values.keys() == cells]
    if not whole:
        return None
    return stat([statistics.fmean(values.values()) for values in whole])


def _cell_key(row: dict) -> tuple:
    return tuple(row.get(key) for key in ("method", "train_lang", "eval_lang", "budget"))


def shares_of(rows: list[dict]) -> dict[str, float]:
    """Each method's trainable share of the towers, in %."""
    return {row["method"]: row["trainable_percent"] for row in rows}


def _under(study: StudyConfig, shares: dict[str, float], below: float) -> list[str]:
    return [m for m in study.methods if m != study.baseline and m in shares and shares[m] < below]


def efficient_method(study: StudyConfig, shares: dict[str, float], below: float = 7.0) -> str | None:
    """The method a "< ``below`` % of parameters" claim is about: mlilt's default (LilT's recipe)
    when it trains few enough, else the first such method in the study's list — chosen by name
    and share, never by its results."""
    fits = _under(study, shares, below)
    return DEFAULT_METHOD if DEFAULT_METHOD in fits else (fits[0] if fits else None)


def norm_method(study: StudyConfig, shares: dict[str, float], below: float = 1.0) -> str | None:
    """LayerNorm alone (``ln``, or ``ln`` on one side) when the study has it, else the first
    method under ``below`` %."""
    fits = _under(study, shares, below)
    alone = [m for m in fits if all(part.name == "ln" for part in parse_method(m))]
    return (alone or fits or [None])[0]


def claims(study: StudyConfig, rows: list[dict], timed: list[dict]) -> list[Claim]:
    """LilT's five claims, answered from the finished cells. ``timed``: one row per cell with
    its held-out recall within the fixed time budget as ``value`` (``report.equal_time``)."""
    base = study.baseline
    shares = shares_of(rows)
    efficient, norm = efficient_method(study, shares), norm_method(study, shares)
    own = own_language(rows)
    top = {lang: max(study.budgets_of(lang)) for lang in study.languages}
    smallest = min(study.budgets)

    def recall(method, keep, source=own):
        return per_seed(source, lambda r: r[MR], lambda r: r["method"] == method and keep(r))

    at_top = lambda r: r["budget"] == top.get(r["train_lang"])  # noqa: E731
    scarce = lambda r: r["budget"] == smallest  # noqa: E731
    away = [r for r in rows if r["transfer"]]
    three_quarters = _scaled(recall(base, at_top), 0.75)
    in_time = lambda m: per_seed(timed, lambda r: r["value"], lambda r: r["method"] == m)  # noqa: E731
    tops = ", ".join(f"{lang} n={n}" for lang, n in top.items())
    return [
        Claim("Parameter-efficient training (< 7% of parameters) matches full training", efficient, f"`{base}`",
              recall(efficient, at_top), recall(base, at_top), "matches", f"own language, {tops}",
              _missing(efficient, base, "a method under 7% of the towers")),
        Claim("LayerNorm alone (< 1%) reaches about 75% of full training", norm, f"0.75 × `{base}`",
              recall(norm, at_top), three_quarters, "matches", f"own language, {tops}",
              _missing(norm, base, "a LayerNorm (or other < 1%) method")),
        Claim("Knowledge is conserved: cross-lingual transfer is better than full training's", efficient,
              f"`{base}`", recall(efficient, at_top, away), recall(base, at_top, away), "better",
              f"languages not trained on, at {tops}",
              _missing(efficient, base, "evaluate.transfer") if away else "the study has no evaluate.transfer"),
        Claim("With scarce data, parameter-efficient training beats full training", efficient, f"`{base}`",
              recall(efficient, scarce), recall(base, scarce), "better", f"own language, n={smallest}",
              _missing(efficient, base, "a method under 7% of the towers")),
        Claim("At fixed compute, parameter-efficient training beats full training", efficient, f"`{base}`",
              in_time(efficient), in_time(base), "better",
              "held-out recall within the same training time, every language and budget",
              _missing(efficient, base, "per-epoch histories")),
    ]


def _scaled(value: Stat | None, factor: float) -> Stat | None:
    if value is None:
        return None
    return Stat(value.mean * factor, None if value.std is None else value.std * factor, value.n)


def _missing(method: str | None, base: str | None, needs: str) -> str:
    if not base:
        return "the study names no baseline"
    return "" if method else f"the study has no {needs}"


def claims_section(study: StudyConfig, rows: list[dict], timed: list[dict]) -> str:
    if not study.baseline or not rows:
        return ""
    body = [claim.row() for claim in claims(study, rows, timed)]
    header = ["LilT's claim", "the numbers (mean ± std over seeds)", "difference", "pooled spread", "verdict"]
    return ("## Claims\n\n" + markdown_table(header, body) +
            "\n\nRule: " + RULE + " Every number is per seed first (the mean over the cells named), then mean ± "
            "std over seeds. The parameter-efficient method is mlilt's default `" + DEFAULT_METHOD + "` (LilT's "
            "recipe) when the study has it, else the first method listed under 7% of the towers; the LayerNorm "
            "method is `ln` (on one or both sides), else the first listed under 1%: chosen by name and share, "
            "never by their results.")
