"""``mlilt bench`` end to end on a tiny grid: real CLI processes, tiny random towers saved as
Hugging Face folders (so every cell process can load them), generated demo data."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_towers import run_mlilt as _mlilt, save_tiny_tower_folders as _save_towers
from PIL import Image

METHODS = ["ln", "full"]
BUDGETS = [24, 48]


def _config(folder: Path, towers: tuple[str, str], **changes) -> Path:
    config = {"name": "tiny", "towers": {"text": towers[0], "image": towers[1]}, "languages": ["en"],
              "methods": METHODS, "baseline": "full", "budgets": BUDGETS, "seeds": [0],
              "train": {"epochs": 2, "batch_size": 8, "holdout": 0.25, "max_length": 16},
              "method_train": {"full": {"lr": 1e-4}},
              "data": {"demo": {"scenes": 80, "image_size": 32}},
              "evaluate": {"benchmark": "demo", "transfer": {"en": ["sw"]}}} | changes
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    towers = _save_towers(folder)
    config = _config(folder, towers)
    out = folder / "out"
    run = _mlilt("bench", "--config", str(config), "--out", str(out), "--jobs", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    return {"folder": folder, "towers": towers, "config": config, "out": out, "stdout": run.stdout}


def _results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


def test_every_cell_has_results(study):
    results = _results(study["out"])
    assert sorted(results) == sorted(f"en_{m}_n{b}_s0" for m in METHODS for b in BUDGETS)
    for result in results.values():
        assert sorted(result["eval"]) == ["en", "sw"]  # its own language, and sw by transfer
        for lang in ("en", "sw"):
            metrics = result["eval"][lang]["metrics"]
            assert 0 <= metrics["mean_recall"] <= 100
            assert set(metrics) >= {"image_retrieval_recall@1", "text_retrieval_recall@10"}
        assert result["trainable"]["params"] > 0 and result["pack_bytes"] > 0
        assert result["train_wall_s"] > 0 and result["train_cpu_s"] > 0 and result["samples_per_s"] > 0 and result["peak_rss_mb"] > 100
        assert result["command"].startswith("mlilt bench --config ")


def test_full_trains_more_than_ln_and_writes_bigger_packs(study):
    results = _results(study["out"])
    ln, full = results["en_ln_n48_s0"], results["en_full_n48_s0"]
    assert full["trainable"]["percent"] == pytest.approx(100.0)
    assert ln["trainable"]["percent"] < 5
    assert full["pack_bytes"] > 2 * ln["pack_bytes"]


def test_budgets_are_nested_training_sets(study):
    """The 24-pair budget is a subset of the 48-pair one (same seed): budgets differ only in size."""
    from mlilt.studies import load_study
    from mlilt.studies.cell import budget_pairs

    config = load_study(study["config"])
    small, large = (budget_pairs(config, study["out"], config.cell(f"en_ln_n{b}_s0")) for b in BUDGETS)
    assert len(small) == 24 and len(large) == 48
    assert {(str(p.image.path), p.caption) for p in small} <= {(str(p.image.path), p.caption) for p in large}


def test_report_tables_and_plots_are_written(study):
    out = study["out"]
    report = (out / "report.md").read_text()
    for heading in ("Mean recall per method", "How close does each method get to fine-tuning",
                    "when pairs are scarce", "cross-lingual transfer", "At a fixed time budget"):
        assert heading in report
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # 4 cells, each on en and (transfer) on sw
    assert len(json.loads((out / "results.json").read_text())) == 8
    for name in ("recall_vs_budget", "recall_vs_trainable", "train_time"):
        with Image.open(out / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 200
        assert f"plots/{name}.png" in report


def test_report_numbers_come_from_the_cells(study):
    """The headline table shows each cell's recorded mean recall, formatted, nowhere invented."""
    results = _results(study["out"])
    report = (study["out"] / "report.md").read_text()
    table_row = next(line for line in report.splitlines() if line.startswith("| `ln` |"))
    expected = [f"{results[f'{lang}_ln_n{b}_s0']['eval'][lang]['metrics']['mean_recall']:.1f}"
                for lang in ("en",) for b in BUDGETS]
    share = f"{results['en_ln_n24_s0']['trainable']['percent']:.3f}"
    assert table_row == f"| `ln` | {share} | " + " | ".join(expected) + " |"


def _claim_rows(report: str) -> list[list[str]]:
    section = report.split("## Claims", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| LilT")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_no_claim_is_called_supported_on_one_seed(study):
    rows = _claim_rows((study["out"] / "report.md").read_text())
    assert len(rows) == 5
    for row in rows:
        assert row[-1] in ("**within noise (one seed)**",) or row[-1].startswith("not measured"), row


@pytest.fixture(scope="module")
def two_seeds(study, tmp_path_factory):
    """The tiny study with a second seed added: the runner trains only the new seed's cells."""
    import shutil

    folder = tmp_path_factory.mktemp("two-seeds")
    out = folder / "out"
    shutil.copytree(study["out"], out)
    config = _config(folder, study["towers"], seeds=[0, 1])
    run = _mlilt("bench", "--config", str(config), "--out", str(out), "--jobs", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 already done, 4 to run" in run.stdout
    return {"out": out, "report": (out / "report.md").read_text()}


def test_claims_follow_the_stated_rule_from_each_seeds_numbers(two_seeds):
    """The first claim (< 7% matches full) recomputed from the cell files by the rule the report states."""
    import math
    import statistics

    results = _results(two_seeds["out"])
    top = max(BUDGETS)
    ln = [results[f"en_ln_n{top}_s{s}"]["eval"]["en"]["metrics"]["mean_recall"] for s in (0, 1)]
    full = [results[f"en_full_n{top}_s{s}"]["eval"]["en"]["metrics"]["mean_recall"] for s in (0, 1)]
    d = statistics.fmean(ln) - statistics.fmean(full)
    s = math.sqrt((statistics.stdev(ln) ** 2 + statistics.stdev(full) ** 2) / 2)
    word = "not supported" if d < -s else "supported"
    first = _claim_rows(two_seeds["report"])[0]
    assert first[1].startswith(f"`ln` {statistics.fmean(ln):.1f} ± {statistics.stdev(ln):.1f} vs `full` "
                               f"{statistics.fmean(full):.1f} ± {statistics.stdev(full):.1f}")
    assert first[2].startswith(f"d = {d:+.1f}") and first[3] == f"s = {s:.1f}" and first[4] == f"**{word}**"
    assert "Rule: d = method − reference" in two_seeds["report"]


def test_the_report_lists_every_seed_and_recall_at_equal_time(two_seeds):
    results = _results(two_seeds["out"])
    report = two_seeds["report"]
    seeds_row = next(line for line in report.split("### Every seed", 1)[1].splitlines() if line.startswith("| `ln`"))
    values = [f"{results[f'en_ln_n{b}_s{s}']['eval']['en']['metrics']['mean_recall']:.1f}" for b in BUDGETS
              for s in (0, 1)]
    assert seeds_row == f"| `ln` | {values[0]}, {values[1]} | {values[2]}, {values[3]} |"
    timed = report.split("## At a fixed time budget", 1)[1]
    assert "T ≈" in timed and "| `full` |" in timed and "±" in timed


def test_the_claims_rule_has_three_outcomes_and_never_supports_one_seed():
    from mlilt.studies.claims import judge
    from mlilt.studies.results import stat

    reference = stat([50.0, 52.0, 54.0])  # 52 ± 2
    assert judge(stat([60.0, 61.0, 62.0]), reference, "better").word == "supported"
    assert judge(stat([40.0, 41.0, 42.0]), reference, "better").word == "not supported"
    assert judge(stat([52.0, 53.0, 54.0]), reference, "better").word == "within noise"
    assert judge(stat([50.0, 51.0, 52.0]), reference, "matches").word == "supported"
    assert judge(stat([40.0, 41.0, 42.0]), reference, "matches").word == "not supported"
    assert judge(stat([90.0]), stat([10.0]), "better").word == "within noise (one seed)"


def test_rerun_skips_done_cells(study):
    before = {p.name: p.stat().st_mtime_ns for p in (study["out"] / "cells").glob("*.json")}
    run = _mlilt("bench", "--config", str(study["config"]), "--out", str(study["out"]))
    assert run.returncode == 0, run.stderr
    assert "4 already done, 0 to run" in run.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (study["out"] / "cells").glob("*.json")} == before


def test_rerun_command_reproduces_the_cell(study):
    result = _results(study["out"])["en_ln_n24_s0"]
    command = shlex.split(result["command"])
    assert command[:2] == ["mlilt", "bench"]
    run = _mlilt(*command[1:])
    assert run.returncode == 0, run.stdout + run.stderr
    again = _results(study["out"])["en_ln_n24_s0"]
    assert again["eval"] == result["eval"]
    timeless = [[{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")} for row in r["history"]]
                for r in (result, again)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 3  # epoch 0 (untrained), 1 and 2


def test_interrupted_study_runs_only_missing_and_stale_cells(study, tmp_path):
    """A lost cell result (an interrupted run) and a changed setting rerun just those cells."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    (out / "cells" / "en_full_n24_s0.json").unlink()
    run = _mlilt("bench", "--config", str(study["config"]), "--out", str(out), "--list")
    assert run.returncode == 0
    pending = [line.split()[-1] for line in run.stdout.splitlines() if line.startswith("pending")]
    assert pending == ["en_full_n24_s0"]
    changed = _config(tmp_path, study["towers"], method_train={"full": {"lr": 2e-4}})
    run = _mlilt("bench", "--config", str(changed), "--out", str(out), "--list")
    pending = [line.split()[-1] for line in run.stdout.splitlines() if line.startswith("pending")]
    assert sorted(pending) == sorted(f"en_full_n{b}_s0" for b in BUDGETS)


@pytest.mark.parametrize("bad, message", [
    ({"methods": ["ln", "nonsense"]}, "unknown method 'nonsense'"),
    ({"optimiser": "sgd"}, "unknown setting optimiser"),
    ({"train": {"epochs": 1, "lang": "de"}}, "train: unknown setting lang"),
    ({"baseline": "lora"}, "baseline names lora"),
    ({"budgets": [24, 1]}, "at least 2 pairs"),
    ({"evaluate": {"benchmark": "xm3600"}}, "needs evaluate.root"),
    ({"data": {"train": "pairs.jsonl"}}, "must be a path containing {lang}"),
])
def test_bad_configs_are_refused_naming_the_setting(study, tmp_path, bad, message):
    config = _config(tmp_path, study["towers"], **bad)
    run = _mlilt("bench", "--config", str(config), "--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and str(config) in run.stderr
    assert not (tmp_path / "out").exists()


def test_budget_larger_than_the_data_is_refused_before_training(study, tmp_path):
    config = _config(tmp_path, study["towers"], budgets=[24, 5000])
    run = _mlilt("bench", "--config", str(config), "--out", str(tmp_path / "out"))
    assert run.returncode == 3, run.stdout + run.stderr
    assert "5000" in run.stderr and "en/train.jsonl" in run.stderr
    assert not (tmp_path / "out" / "cells").exists()


def _default_sigint() -> None:
    """A job started in the background by a non-interactive shell (CI) inherits SIGINT ignored;
    Ctrl-C at a terminal is what this test plays, so the study starts with the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_keeps_finished_cells_and_a_rerun_finishes_the_rest(study, tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-study: finished cells stay, whole and valid;
    nothing more is launched; the next run does only what is missing."""
    import signal
    import time

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "mlilt", "bench", "--config", str(study["config"]),
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while not list((out / "cells").glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    done = _results(out)  # every file written is a whole JSON result
    assert 1 <= len(done) < 4, output
    run = _mlilt("bench", "--config", str(study["config"]), "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(done)} already done, {4 - len(done)} to run" in run.stdout
    assert len(_results(out)) == 4


def test_a_seed_still_running_does_not_count_towards_a_claim():
    """A study stopped mid-seed: a seed's mean must be over the same cells as the others'."""
    from mlilt.studies.claims import per_seed

    def row(seed, budget, value):
        return {"method": "ln", "train_lang": "sw", "eval_lang": "sw", "budget": budget, "seed": seed, "v": value}

    rows = [row(0, 100, 40.0), row(0, 500, 80.0), row(1, 100, 50.0), row(1, 500, 90.0), row(2, 100, 10.0)]
    both = per_seed(rows, lambda r: r["v"], lambda r: True)
    assert (both.mean, both.n) == (65.0, 2)  # seeds 0 and 1 (60, 70); seed 2 has only one of the two cells
    small = per_seed(rows, lambda r: r["v"], lambda r: r["budget"] == 100)
    assert small.n == 3 and small.mean == pytest.approx(100 / 3)
