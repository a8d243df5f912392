"""The study's report: results.csv / results.json, plots, and report.md answering the seed
paper's questions from the numbers the cells wrote — nothing here is typed in by hand."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from mlilt.files import atomic
from mlilt.studies.claims import claims_section, efficient_method, judge, per_seed, shares_of
from mlilt.studies.config import StudyConfig
from mlilt.studies.results import group, load_histories, load_rows, markdown_table, own_language, plain, rows_csv

MR = "mean_recall"


def write_report(study: StudyConfig, out: Path) -> Path:
    """Write results.csv, results.json, the plots and report.md into ``out``; return the report path."""
    from mlilt.studies.plots import write_plots, write_signal_plots

    rows = load_rows(study, out)
    atomic.write_text(out / "results.csv", rows_csv(rows))
    atomic.write_text(out / "results.json", json.dumps(rows, indent=1, sort_keys=True) + "\n")
    plots = (write_plots(study, plain(rows), out) if plain(rows) else []) + write_signal_plots(study, rows, out)
    report = out / "report.md"
    atomic.write_text(report, render_report(study, out, rows, plots))
    return report


def render_report(study: StudyConfig, out: Path, rows: list[dict], plots: list[Path]) -> str:
    from mlilt.studies.signals import signals_section

    cells_done = len({row["cell_id"] for row in rows})
    parts = [_header(study, out, cells_done)]
    pairs_only = plain(rows)
    timed, limits = equal_time(study, out, pairs_only) if pairs_only else ([], {})
    if pairs_only:
        parts += [claims_section(study, pairs_only, timed), _results_section(study, pairs_only),
                  _seeds_section(study, pairs_only), _cost_section(study, pairs_only),
                  _baseline_section(study, pairs_only), _scarce_section(study, pairs_only)]
    if rows:
        parts.append(signals_section(study, rows))
    if pairs_only:
        parts += [_transfer_section(study, pairs_only), _time_section(study, timed, limits),
                  _plots_section(plots, out)]
    return "\n\n".join(part for part in parts if part) + "\n"


def _header(study: StudyConfig, out: Path, cells_done: int) -> str:
    command = shlex.join(["mlilt", "bench", "--config", str(study.path), "--out", str(out)])
    total = len(study.cells())
    lines = [f"# Study `{study.name}`", study.description.strip(),
             f"- towers: text `{study.text_tower}`, image `{study.image_tower}`",
             f"- benchmark: `{study.evaluate.benchmark}`; languages trained: {', '.join(study.languages)}; "
             f"budgets (training pairs, 10% of them held out to pick the epoch unless set): "
             f"{_budget_text(study)}; seeds: {', '.join(map(str, study.seeds))}",
             _parallel_text(study),
             f"- cells finished: {cells_done} of {total}" + ("" if cells_done == total else " (the report covers "
                                                            "only the finished ones)"),
             f"- reproduce: `{command}`; each cell's own command is in `results.csv`",
             "- metric: mean recall = mean of R@1/5/10 text→image and image→text, in % "
             "(mean ± sample std over seeds where there is more than one)"]
    return "\n".join(line for line in lines if line)


def _budget_text(study: StudyConfig) -> str:
    if not study.lang_budgets:
        return ", ".join(map(str, study.budgets))
    return "; ".join(f"{lang} {', '.join(map(str, study.budgets_of(lang)))}" for lang in study.languages)


def _parallel_text(study: StudyConfig) -> str:
    spec = study.parallel
    if spec is None:
        return ""
    return (f"- students: {', '.join(spec.languages)} learned from parallel sentences "
            f"({spec.teacher_lang}→student language; {', '.join(map(str, spec.sizes))} of them) distilled from "
            f"the study's own {spec.teacher_lang} cell at {spec.teacher_budget} pairs (same method and seed), "
            f"with {' or '.join(str(b) if b else 'no' for b in spec.with_pairs)} image-caption pairs of their "
            f"own language")


def _columns(study: StudyConfig) -> list[tuple[str, int]]:
    return [(lang, budget) for lang in study.languages for budget in study.budgets_of(lang)]


def _results_section(study: StudyConfig, rows: list[dict]) -> str:
    recall = group(own_language(rows), MR, "method", "train_lang", "budget")
    share = group(rows, "trainable_percent", "method")
    header = ["method", "trainable %"] + [f"{lang} n={budget}" for lang, budget in _columns(study)]
    body = [[f"`{m}`", f"{share[(m,)].mean:.3f}" if (m,) in share else "–"] +
            [str(recall.get((m, *col), "–")) for col in _columns(study)] for m in study.methods]
    return ("## Mean recall per method, language and data budget (own-language test set)\n\nTrainable % is "
            "LilT's count: the tower parameters a method trains, as a share of both towers' parameters (the "
            "projection heads into the shared space train in every method and are not counted).\n\n" +
            markdown_table(header, body))


def _seeds_section(study: StudyConfig, rows: list[dict]) -> str:
    """Every seed's own-language mean recall, so a spread can be checked by eye."""
    if len(study.seeds) < 2:
        return ""
    values: dict[tuple, dict[int, float]] = {}
    for row in own_language(rows):
        values.setdefault((row["method"], row["train_lang"], row["budget"]), {})[row["seed"]] = row[MR]
    header = ["method"] + [f"{lang} n={budget}" for lang, budget in _columns(study)]
    body = [[f"`{m}`"] + [", ".join(f"{seeds[s]:.1f}" for s in study.seeds if s in seeds)
                          if (seeds := values.get((m, *col))) else "–" for col in _columns(study)]
            for m in study.methods]
    seeds = ", ".join(map(str, study.seeds))
    return f"### Every seed (seeds {seeds}, in that order)\n\n" + markdown_table(header, body)


def _cost_section(study: StudyConfig, rows: list[dict]) -> str:
    top = max(study.budgets)
    at_top = [row for row in own_language(rows) if row["budget"] == top]
    stats = {name: group(at_top, name, "method") for name in
             ("trainable_percent", "pack_bytes", "train_wall_s", "train_cpu_s", "samples_per_s", "peak_rss_mb")}
    body = []
    for m in study.methods:
        if (m,) not in stats["train_wall_s"]:
            continue
        body.append([f"`{m}`", f"{stats['trainable_percent'][(m,)].mean:.3f}",
                     f"{stats['pack_bytes'][(m,)].mean / 1e6:.2f}", f"{stats['train_wall_s'][(m,)].mean:.0f}",
                     f"{stats['train_cpu_s'][(m,)].mean:.0f}",
                     f"{stats['samples_per_s'][(m,)].mean:.1f}", f"{stats['peak_rss_mb'][(m,)].mean:.0f}"])
    header = ["method", "trainable % of towers", "pack MB", f"train wall s (n={top})", "train CPU s",
              "samples/s", "peak RSS MB"]
    return (f"## Cost per method (budget {top}, mean over languages and seeds)\n\n" + markdown_table(header, body) +
            "\n\nTrain wall time includes loading the towers and computing (or reading cached) image features; "
            "samples/s counts training steps only. Peak RSS is the cell process's peak while training.")


def _baseline_section(study: StudyConfig, rows: list[dict]) -> str:
    base = study.baseline
    if not base:
        return ""
    recall = group(own_language(rows), MR, "method", "train_lang", "budget")
    header = ["method"] + [f"{lang} n={budget}" for lang, budget in _columns(study)]
    body, ratios = [], {}
    for m in study.methods:
        if m == base:
            continue
        cells = []
        for col in _columns(study):
            mine, theirs = recall.get((m, *col)), recall.get((base, *col))
            if mine and theirs and theirs.mean > 0:
                ratios.setdefault(m, []).append(mine.mean / theirs.mean)
                cells.append(f"{mine.mean / theirs.mean:.2f}")
            else:
                cells.append("–")
        body.append([f"`{m}`"] + cells)
    summary = [f"`{m}` reaches {min(r):.2f}–{max(r):.2f}× the baseline's mean recall" for m, r in ratios.items()]
    return (f"## How close does each method get to fine-tuning (`{base}`)?\n\nRatio of mean recall, method / "
            f"`{base}` (1.00 = equal, above 1 = better than the baseline).\n\n" + markdown_table(header, body) +
            ("\n\n" + "; ".join(summary) + "." if summary else ""))


def _scarce_section(study: StudyConfig, rows: list[dict]) -> str:
    base = study.baseline
    if not base or len(study.methods) < 2:
        return ""
    recall = group(own_language(rows), MR, "method", "train_lang", "budget")
    lines = []
    for budget in sorted(study.budgets):
        wins, compared = [], 0
        for lang in study.languages:
            theirs = recall.get((base, lang, budget))
            mine = {m: recall[(m, lang, budget)] for m in study.methods if m != base and (m, lang, budget) in recall}
            if not theirs or not mine:
                continue
            compared += 1
            best = max(mine, key=lambda m: mine[m].mean)
            if mine[best].mean > theirs.mean:
                wins.append(f"{lang} (`{best}` {mine[best]} vs {theirs}: {judge(mine[best], theirs, 'better').word})")
        if compared:
            verdict = f"higher in {len(wins)} of {compared} languages" + (": " + ", ".join(wins) if wins else "")
            lines.append(f"- **{budget} pairs**: the best parameter-efficient method is {verdict}.")
    if not lines:
        return ""
    return (f"## Is parameter-efficient training better than `{base}` when pairs are scarce?\n\n"
            "Per budget, the best other method against the baseline (own-language mean recall; picked after "
            "seeing the results, so the claims table above judges one fixed method instead; each verdict by "
            "its rule):\n\n" +
            "\n".join(lines))


def _transfer_section(study: StudyConfig, rows: list[dict]) -> str:
    if not study.evaluate.transfer:
        return ""
    recall = group(rows, MR, "method", "train_lang", "eval_lang", "budget")
    parts = ["## Knowledge conservation: cross-lingual transfer\n\nA pack trained on one language, evaluated on "
             "others it saw no pairs in. Retention = mean recall on the target / on the training language. "
             "\"Target-trained\" is the same method trained on the target language's own pairs (when the study "
             "trains it)."]
    for source, targets in study.evaluate.transfer.items():
        for budget in study.budgets:
            body, retention = [], {}
            for m in study.methods:
                own = recall.get((m, source, source, budget))
                for target in targets:
                    away = recall.get((m, source, target, budget))
                    native = recall.get((m, target, target, budget))
                    if not own or not away:
                        continue
                    kept = away.mean / own.mean if own.mean > 0 else float("nan")
                    retention.setdefault(m, []).append(kept)
                    body.append([f"`{m}`", target, str(own), str(away), f"{kept:.2f}", str(native or "–")])
            if not body:
                continue
            parts.append(f"### trained on {source}, {budget} pairs\n\n" + markdown_table(
                ["method", "target", f"on {source}", "on target", "retention", "target-trained"], body))
            parts.append(_retention_verdict(study, retention))
    return "\n\n".join(parts)


def _retention_verdict(study: StudyConfig, retention: dict[str, list[float]]) -> str:
    mean = {m: sum(v) / len(v) for m, v in retention.items()}
    best = max(mean, key=mean.get)
    text = f"Best retention: `{best}` ({mean[best]:.2f})."
    base = study.baseline
    if base in mean and base != best:
        text += f" `{base}` keeps {mean[base]:.2f}: {mean[best] - mean[base]:.2f} less than `{best}`."
    return text


def equal_time(study: StudyConfig, out: Path, rows: list[dict]) -> tuple[list[dict], dict[tuple, float]]:
    """Recall at equal training time: for each language, budget and seed, T = the shorter of the
    parameter-efficient method's and the baseline's training steps (``claims.efficient_method``),
    and each method's best held-out recall among the epochs that ended within T.

    Returns one row per cell (method, train_lang, eval_lang, budget, seed and the recall within T
    as ``value``, the shape ``claims.per_seed`` reads) and (lang, budget, seed) -> T."""
    histories = load_histories(study, out)
    efficient, base = efficient_method(study, shares_of(rows)), study.baseline
    finish = {key: sum(r["seconds"] for r in h if r["epoch"] >= 1) for key, h in histories.items()}
    timed, limits = [], {}
    for (method, lang, budget, seed), history in histories.items():
        ends = [finish.get((m, lang, budget, seed)) for m in (efficient, base)]
        if None in ends:
            continue
        limit = limits.setdefault((lang, budget, seed), min(ends))
        elapsed, best = 0.0, history[0]["val"][MR]
        for row in history[1:]:
            elapsed += row["seconds"]
            if elapsed <= limit + 1e-9:
                best = max(best, row["val"][MR])
        timed.append({"method": method, "train_lang": lang, "eval_lang": lang, "budget": budget, "seed": seed,
                      "value": best})
    return timed, limits


def _time_section(study: StudyConfig, timed: list[dict], limits: dict[tuple, float]) -> str:
    if not timed:
        return ""
    columns = [col for col in _columns(study) if any((r["train_lang"], r["budget"]) == col for r in timed)]
    header = ["method"] + [f"{lang} n={b} (T ≈ {_mean_limit(limits, lang, b):.0f} s)" for lang, b in columns]
    body = [[f"`{m}`"] + [str(per_seed(timed, lambda r: r["value"], lambda r, m=m, c=c: (
        r["method"], r["train_lang"], r["budget"]) == (m, *c)) or "–") for c in columns]
            for m in study.methods if any(r["method"] == m for r in timed)]
    return ("## At a fixed time budget\n\nT is the shorter of the parameter-efficient method's and the baseline's "
            "training steps (per language, budget and seed; its mean over seeds in the header). Each cell is "
            "the best held-out mean recall (the budget's held-out part, checked at epoch ends; the untrained "
            "pack's when no epoch ended within T) that each method had reached within T, mean ± std over "
            "seeds:\n\n" + markdown_table(header, body))


def _mean_limit(limits: dict[tuple, float], lang: str, budget: int) -> float:
    values = [t for (l, b, _s), t in limits.items() if (l, b) == (lang, budget)]
    return sum(values) / len(values)


def _plots_section(plots: list[Path], out: Path) -> str:
    if not plots:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots)
