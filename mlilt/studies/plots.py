"""The study's PNG plots (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

from mlilt.files import atomic
from mlilt.studies.config import StudyConfig
from mlilt.studies.results import group, own_language

MR = "mean_recall"


def write_plots(study: StudyConfig, rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    own = own_language(rows)
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(_recall_vs_budget(study, own), folder / "recall_vs_budget.png"),
            _save(_recall_vs_trainable(study, own), folder / "recall_vs_trainable.png"),
            _save(_train_time(study, own), folder / "train_time.png")]


def write_signal_plots(study: StudyConfig, rows: list[dict], out: Path) -> list[Path]:
    """With student cells: mean recall against parallel sentences per signal, one panel per student language."""
    if study.parallel is None or not any(row["parallel"] for row in rows):
        return []
    import matplotlib

    matplotlib.use("Agg")
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(_recall_vs_parallel(study, rows), folder / "recall_vs_parallel.png")]


def _recall_vs_parallel(study: StudyConfig, rows: list[dict]):
    import matplotlib.pyplot as plt

    spec = study.parallel
    figure, axes = plt.subplots(1, len(spec.languages), figsize=(5.2 * len(spec.languages), 3.8), squeeze=False)
    for ax, lang in zip(axes[0], spec.languages):
        on_lang = [row for row in rows if row["eval_lang"] == lang]
        recall = group(on_lang, MR, "method", "train_lang", "budget", "parallel")
        for method in study.methods:
            for pairs in spec.with_pairs:
                points = [(n, recall[(method, lang, pairs, n)]) for n in spec.sizes
                          if (method, lang, pairs, n) in recall]
                label = f"{method}: {pairs} {lang} pairs + sentences" if pairs else f"{method}: sentences only"
                if points:
                    ax.errorbar([n for n, _ in points], [s.mean for _, s in points],
                                yerr=[s.std or 0.0 for _, s in points], marker="o", capsize=3, label=label)
            flat = [(f"{method}: {b} {lang} pairs only", recall.get((method, lang, b, 0)), "--")
                    for b in study.budgets_of(lang) if lang in study.languages]
            flat.append((f"{method}: {spec.teacher_lang} pack, {lang} queries",
                         recall.get((method, spec.teacher_lang, spec.teacher_budget, 0)), ":"))
            for label, value, style in flat:
                if value is not None:
                    colour = "grey" if style == ":" else "black"
                    ax.axhline(value.mean, linestyle=style, color=colour, label=label)
                    if value.std:
                        ax.axhspan(value.mean - value.std, value.mean + value.std, color=colour, alpha=0.1)
        ax.set_xscale("log")
        ax.set_xticks(spec.sizes, [f"{n:,}" for n in spec.sizes])
        ax.minorticks_off()
        ax.set_title(lang)
        ax.set_xlabel(f"parallel sentences ({spec.teacher_lang}→{lang})")
        ax.set_ylabel(f"mean recall (%), {lang} test")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"{study.name}: sources of signal (mean ± std over seeds)")
    return figure


def _save(figure, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic.write_bytes(path, buffer.getvalue())
    return path


def _recall_vs_budget(study: StudyConfig, rows: list[dict]):
    import matplotlib.pyplot as plt

    recall = group(rows, MR, "method", "train_lang", "budget")
    langs = study.languages
    figure, axes = plt.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.6), squeeze=False, sharey=True)
    for ax, lang in zip(axes[0], langs):
        for method in study.methods:
            points = [(b, recall[(method, lang, b)]) for b in sorted(study.budgets) if (method, lang, b) in recall]
            if points:
                ax.errorbar([b for b, _ in points], [s.mean for _, s in points],
                            yerr=[s.std or 0.0 for _, s in points], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(sorted(study.budgets), [f"{b:,}" for b in sorted(study.budgets)])
        ax.minorticks_off()  # log-scale minor labels crowd a few budgets
        ax.set_title(lang)
        ax.set_xlabel("training pairs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean recall (%)")
    axes[0][-1].legend(fontsize=8)
    figure.suptitle(f"{study.name}: mean recall vs data budget")
    return figure


def _recall_vs_trainable(study: StudyConfig, rows: list[dict]):
    import matplotlib.pyplot as plt

    top = max(study.budgets)
    at_top = [row for row in rows if row["budget"] == top]
    recall = group(at_top, MR, "method", "train_lang")
    share = group(at_top, "trainable_percent", "method")
    figure, ax = plt.subplots(figsize=(5.5, 4))
    markers = "osD^v<>ph*"
    for i, lang in enumerate(study.languages):
        points = [(share[(m,)].mean, recall[(m, lang)].mean, m) for m in study.methods if (m, lang) in recall]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], label=lang)
        for x, y, method in points:
            ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of both towers)")
    ax.set_ylabel(f"mean recall (%), {top} pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{study.name}: quality vs trainable share")
    return figure


def _train_time(study: StudyConfig, rows: list[dict]):
    import matplotlib.pyplot as plt

    top = max(study.budgets)
    seconds = group([row for row in rows if row["budget"] == top], "train_wall_s", "method")
    methods = [m for m in study.methods if (m,) in seconds]
    figure, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(methods)), 3.6))
    ax.bar(methods, [seconds[(m,)].mean for m in methods], yerr=[seconds[(m,)].std or 0.0 for m in methods],
           capsize=3, color="tab:blue")
    ax.set_ylabel(f"training wall time (s), {top} pairs")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.set_title(f"{study.name}: training time per method")
    return figure
