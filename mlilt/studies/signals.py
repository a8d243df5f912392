"""The report's comparison of sources of signal for a student language.

(a) image-caption pairs of the language alone (the study's own cells of it);
(b) parallel sentences alone, distilled from the teacher cell (no image of the language);
(c) both;
(d) the teacher pack itself with queries in the language (its cross-lingual transfer).

Each is mean ± sample std over seeds (``results.group``). Two signals are told apart only where
their mean ± std ranges do not overlap; otherwise the report says the difference is not
distinguishable from seed noise.
"""
from __future__ import annotations

from mlilt.studies.config import StudyConfig
from mlilt.studies.results import Stat, group, markdown_table

MR = "mean_recall"
R1 = "image_retrieval_recall@1"


def signals_section(study: StudyConfig, rows: list[dict]) -> str:
    spec = study.parallel
    if spec is None:
        return ""
    parts = [f"## Sources of signal: image-caption pairs, parallel sentences, both, or the {spec.teacher_lang} "
             f"pack\n\nEach student language is tested on its own test captions. (a) its own image-caption "
             f"pairs only; (b) {spec.teacher_lang}→student parallel sentences only, distilled from the study's "
             f"{spec.teacher_lang} pack ({spec.teacher_budget} pairs, same method and seed), whose image side it "
             f"shares — no image with a caption in the student language; (c) both; (d) the {spec.teacher_lang} "
             f"pack itself with queries in the student language. Mean ± sample std over seeds; a difference "
             f"counts only where the two mean ± std ranges do not overlap."]
    for lang in spec.languages:
        for method in study.methods:
            signals = _signals(study, rows, lang, method)
            if any(signals.values()):
                parts.append(_lang_section(study, lang, method, signals))
    return "\n\n".join(parts)


def _signals(study: StudyConfig, rows: list[dict], lang: str, method: str) -> dict:
    """Per signal, (image-caption pairs, parallel sentences) -> {metric: Stat} on ``lang``'s test set."""
    spec = study.parallel
    on_lang = [r for r in rows if r["eval_lang"] == lang and r["method"] == method]
    stats = {metric: group(on_lang, metric, "train_lang", "budget", "parallel") for metric in (MR, R1)}

    def pick(keys: list[tuple]) -> dict:
        return {(budget, size): {m: stats[m][(src, budget, size)] for m in stats}
                for src, budget, size in keys if (src, budget, size) in stats[MR]}

    own_budgets = study.budgets_of(lang) if lang in study.languages else []
    pairs_budgets = sorted(set(own_budgets) & set(spec.with_pairs) or own_budgets)
    return {
        "a": pick([(lang, b, 0) for b in pairs_budgets]),
        "b": pick([(lang, 0, size) for size in spec.sizes]) if 0 in spec.with_pairs else {},
        "c": pick([(lang, b, size) for size in spec.sizes for b in spec.with_pairs if b]),
        "d": pick([(spec.teacher_lang, spec.teacher_budget, 0)]),
    }


LABELS = {"a": "(a) own pairs only", "b": "(b) parallel only", "c": "(c) pairs + parallel",
          "d": "(d) {teacher} pack, {lang} queries"}


def _lang_section(study: StudyConfig, lang: str, method: str, signals: dict) -> str:
    spec = study.parallel
    body = []
    for key in "abcd":
        label = LABELS[key].format(teacher=spec.teacher_lang, lang=lang)
        for (budget, size), stats in sorted(signals[key].items()):
            pairs = f"0 ({spec.teacher_budget} {spec.teacher_lang})" if key == "d" else str(budget)
            body.append([label, pairs, str(size) if size else "–", str(stats[MR]), str(stats[R1]),
                         str(stats[MR].n)])
    table = markdown_table(["signal", f"{lang} image-caption pairs", "parallel sentences", "mean recall",
                    "text→image R@1", "seeds"], body)
    return (f"### {lang}, `{method}`\n\n" + table + "\n\n" + "\n".join(_verdicts(study, lang, signals)))


def _verdicts(study: StudyConfig, lang: str, signals: dict) -> list[str]:
    """A plain sentence per parallel size, whether (b) and (c) beat (a), and a summary."""
    pairs = signals["a"]
    if not pairs:
        return [f"No (a) cell of {lang} is finished (or in the study), so (b) and (c) have nothing to be "
                f"compared with."]
    base_key = max(pairs)
    base, base_name = pairs[base_key][MR], f"(a) {base_key[0]} {lang} pairs"
    lines, verdicts = [], {"b": {}, "c": {}}
    for size in study.parallel.sizes:
        said = []
        for key, name in (("b", "parallel only"), ("c", "pairs + parallel")):
            found = [stats[MR] for (_budget, s), stats in sorted(signals[key].items()) if s == size]
            if found:
                verdicts[key][size] = _verdict(found[-1], base)
                said.append(f"({key}) {name}, {found[-1]}, {_compare(found[-1], base, '(a)')}")
        if said:
            lines.append(f"- **{size} parallel sentences** against {base_name} ({base}): " + "; ".join(said) + ".")
    teacher = signals["d"]
    if teacher:
        stats = next(iter(teacher.values()))[MR]
        lines.append(f"- (d) the {study.parallel.teacher_lang} pack with {lang} queries, {stats}, "
                     f"{_compare(stats, base, '(a)')}.")
    summary = [_summary(key, name, verdicts[key]) for key, name in (("b", "parallel sentences only"),
                                                                     ("c", "pairs + parallel sentences"))
               if verdicts[key]]
    if summary:
        lines.append(f"\n**In short ({lang}):** " + " ".join(summary))
    return lines


def _summary(key: str, name: str, verdicts: dict[int, str]) -> str:
    """'(b) ... beats (a) at 250, 500 sentences; not distinguishable at 1500.'"""
    said = {"beats": "beats (a)", "below": "is below (a)", "noise": "is not distinguishable from (a) (seed noise)",
            "one seed": "differs from (a) on one seed only (no spread to judge by)"}
    parts = []
    for word, phrase in said.items():
        sizes = [str(size) for size, verdict in verdicts.items() if verdict == word]
        if sizes:
            parts.append(f"{phrase} at {', '.join(sizes)} sentences")
    return f"({key}) {name} " + "; ".join(parts) + "."


def _verdict(mine: Stat, theirs: Stat) -> str:
    """beats / below / noise (mean ± std ranges overlap) / one seed (no spread to judge by)."""
    if mine.std is None or theirs.std is None:
        return "one seed"
    if abs(mine.mean - theirs.mean) <= mine.std + theirs.std:
        return "noise"
    return "beats" if mine.mean > theirs.mean else "below"


def _compare(mine: Stat, theirs: Stat, name: str) -> str:
    verdict = _verdict(mine, theirs)
    if verdict == "one seed":
        return f"{'above' if mine.mean > theirs.mean else 'below'} {name} on one seed (no spread to judge by)"
    if verdict == "noise":
        return (f"not distinguishable from {name}: the mean ± std ranges overlap, so the difference "
                f"({mine.mean - theirs.mean:+.1f}) is within seed noise")
    return f"beats {name} ({mine.mean - theirs.mean:+.1f})" if verdict == "beats" else \
        f"below {name} ({mine.mean - theirs.mean:+.1f})"


