"""Studies that compare sources of signal for a language: image-caption pairs, parallel sentences
distilled from the study's own teacher cell, both, and the teacher pack itself. Config checks,
cell ids and order, the demo parallel sentences, and a real tiny study run by ``mlilt bench``
(tiny Hugging Face towers saved to folders, so every cell process loads them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_towers import run_mlilt as _mlilt, save_tiny_tower_folders as _save_towers

from mlilt.errors import UsageError
from mlilt.studies import load_study
from mlilt.studies.config import Cell
from mlilt.studies.results import stat
from mlilt.studies.signals import _compare, _summary

REPO = Path(__file__).resolve().parents[1]
PARALLEL = {"sizes": [20, 40], "languages": ["sw"], "teacher": {"lang": "en", "budget": 24}, "with_pairs": [0, 16]}


def _config(folder: Path, towers=("tiny-text", "tiny-image"), **changes) -> Path:
    config = {"name": "signals", "towers": {"text": towers[0], "image": towers[1]}, "languages": ["en", "sw"],
              "methods": ["ln"], "budgets": {"en": [24], "sw": [16]}, "seeds": [0, 1],
              "train": {"steps": 4, "batch_size": 8, "holdout": 0.25, "max_length": 16, "checkpoint_every": 0},
              "data": {"demo": {"scenes": 80, "image_size": 32}},
              "evaluate": {"benchmark": "demo", "transfer": {"en": ["sw"]}}, "parallel": PARALLEL} | changes
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- config and cells


@pytest.mark.parametrize("bad, message", [
    ({"parallel": {**PARALLEL, "size": [20]}}, "parallel: unknown setting size"),
    ({"parallel": {k: v for k, v in PARALLEL.items() if k != "teacher"}}, "parallel: missing teacher"),
    ({"parallel": {**PARALLEL, "sizes": [20, 0]}}, "parallel.sizes: every value must be at least 4"),
    ({"parallel": {**PARALLEL, "sizes": "many"}}, "parallel.sizes: expected a non-empty list of integers"),
    ({"parallel": {**PARALLEL, "with_pairs": [0, 1]}}, "parallel.with_pairs: 0 (parallel text only) or at least 2"),
    ({"parallel": {**PARALLEL, "teacher": {"lang": "de", "budget": 24}}}, "parallel.teacher.lang de is not in "
                                                                          "languages"),
    ({"parallel": {**PARALLEL, "teacher": {"lang": "en", "budget": 16}}}, "parallel.teacher.budget 16 is not a "
                                                                          "budget of en (24)"),
    ({"parallel": {**PARALLEL, "teacher": {"lang": "en", "pairs": 24}}}, "parallel.teacher: unknown setting pairs"),
    ({"parallel": {**PARALLEL, "languages": ["en"]}}, "parallel.languages: en is the teacher's language"),
    ({"parallel": {**PARALLEL, "train": "en-sw.tsv"}}, "parallel.train must be a path containing {lang}"),
    ({"parallel": {**PARALLEL, "seed": 0}}, "parallel.seed must be an integer other than data.demo.seed"),
    ({"parallel": [20, 40]}, "parallel: expected a mapping"),
    ({"data": {"train": "pairs/{lang}.jsonl"}}, "parallel: give train: path/with/{lang}.tsv"),
    ({"budgets": {"en": [24]}}, "budgets as a mapping needs one list per language"),
    ({"budgets": {"en": [24], "sw": [0]}}, "budgets.sw: every budget must be at least 2 pairs"),
    ({"train": {"steps": 4, "teacher": "langpacks/en"}}, "train: unknown setting teacher"),
])
def test_bad_parallel_sections_are_refused_naming_the_file_and_key(tmp_path, bad, message):
    path = _config(tmp_path, **bad)
    with pytest.raises(UsageError) as error:
        load_study(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_student_cells_follow_their_teachers_and_have_their_own_ids(tmp_path):
    study = load_study(_config(tmp_path))
    ids = [cell.id for cell in study.cells()]
    assert ids[:6] == ["sw_ln_n16_s0", "en_ln_n24_s0", "sw_ln_n0_p20_s0", "sw_ln_n16_p20_s0", "sw_ln_n0_p40_s0",
                       "sw_ln_n16_p40_s0"]
    assert len(ids) == 12 and len(set(ids)) == 12
    for cell in study.cells():
        assert study.cell(cell.id) == cell
        teacher = study.teacher_of(cell)
        if cell.parallel:
            assert teacher == Cell("en", "ln", 24, cell.seed)
            assert ids.index(teacher.id) < ids.index(cell.id)
            assert study.eval_languages(cell) == ["sw"]
        else:
            assert teacher is None and cell.budget >= 2
    assert study.teachers() == [Cell("en", "ln", 24, 0), Cell("en", "ln", 24, 1)]


def test_a_changed_teacher_makes_its_students_stale_and_adding_a_size_changes_no_cell(tmp_path):
    study = load_study(_config(tmp_path))
    student = study.cell("sw_ln_n0_p20_s0")
    changed = load_study(_config(tmp_path, method_train={"ln": {"lr": 2e-3}}))
    assert changed.cell_hash(student) != study.cell_hash(student)
    more = load_study(_config(tmp_path, parallel={**PARALLEL, "sizes": [20, 40, 80]}))
    assert all(more.cell_hash(cell) == study.cell_hash(cell) for cell in study.cells())
    without = load_study(_without_parallel(tmp_path))
    assert all(without.cell_hash(cell) == study.cell_hash(cell) for cell in without.cells())


def _without_parallel(folder: Path) -> Path:
    path = _config(folder)
    raw = yaml.safe_load(path.read_text())
    raw.pop("parallel")
    path.write_text(yaml.safe_dump(raw))
    return path


def test_committed_study_cells_keep_their_ids_and_results():
    """Studies written before students existed: the same cells, and their results still current."""
    from mlilt.studies.runner import is_done

    study = load_study(REPO / "benchmarks" / "configs" / "demo-quick.yaml")
    out = REPO / "benchmarks" / "results" / "demo-quick"
    committed = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert sorted(cell.id for cell in study.cells()) == committed
    assert all(is_done(study, out, cell) for cell in study.cells())


def test_the_committed_distillation_study_config_is_valid():
    study = load_study(REPO / "benchmarks" / "configs" / "demo-distill.yaml")
    assert study.parallel is not None and len(study.seeds) >= 3 and len(study.parallel.sizes) >= 2
    assert "steps" in study.train
    assert study.parallel.languages[0] in study.evaluate.transfer[study.parallel.teacher_lang]


def test_demo_parallel_sentences_share_no_caption_with_the_images_and_are_nested(tmp_path):
    from mlilt.studies.runner import prepare_data

    study = load_study(_config(tmp_path))
    out = tmp_path / "out"
    prepare_data(study, out)
    path = out / "data" / "parallel" / "en-sw.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40 and len(set(lines)) == 40
    captions = {json.loads(line)["caption"] for lang in ("en", "sw") for split in ("train", "test")
                for line in (out / "data" / lang / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()}
    for line in lines:
        source, target = line.split("\t")
        assert source not in captions and target not in captions
    prepare_data(load_study(_config(tmp_path, parallel={**PARALLEL, "sizes": [20, 60]})), out)
    assert path.read_text(encoding="utf-8").splitlines()[:40] == lines  # a larger file holds the smaller


# --------------------------------------------------------------------------- report wording


def test_verdicts_tell_a_real_difference_from_seed_noise():
    a = stat([40.0, 42.0, 44.0])  # 42 ± 2
    assert _compare(stat([50.0, 51.0, 52.0]), a, "(a)") == "beats (a) (+9.0)"
    assert _compare(stat([30.0, 31.0, 32.0]), a, "(a)") == "below (a) (-11.0)"
    assert _compare(stat([43.0, 45.0, 47.0]), a, "(a)") == ("not distinguishable from (a): the mean ± std ranges "
                                                            "overlap, so the difference (+3.0) is within seed noise")
    assert _compare(stat([50.0]), stat([40.0]), "(a)") == "above (a) on one seed (no spread to judge by)"
    assert _summary("b", "parallel only", {250: "beats", 500: "noise", 1500: "beats"}) == (
        "(b) parallel only beats (a) at 250, 1500 sentences; is not distinguishable from (a) (seed noise) at 500 "
        "sentences.")


# --------------------------------------------------------------------------- a real tiny study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    towers = _save_towers(folder)
    config = _config(folder, towers, parallel={**PARALLEL, "sizes": [20]})
    out = folder / "out"
    run = _mlilt("bench", "--config", str(config), "--out", str(out), "--jobs", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    return {"config": config, "out": out, "stdout": run.stdout}


def _results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


def test_students_learn_from_the_studys_own_teacher_cell(study):
    results = _results(study["out"])
    students = [f"sw_ln_n{b}_p20_s{s}" for s in (0, 1) for b in (0, 16)]
    assert sorted(results) == sorted(students + [f"{c}_s{s}" for c in ("en_ln_n24", "sw_ln_n16") for s in (0, 1)])
    for cell_id in students:
        result = results[cell_id]
        seed = result["cell"]["seed"]
        assert result["cell"]["parallel"] == 20 and result["teacher"]["cell_id"] == f"en_ln_n24_s{seed}"
        assert sorted(result["eval"]) == ["sw"]
        assert result["settings"]["teacher"] == result["teacher"]["pack"]
        assert (result["settings"]["data"] is None) == (result["cell"]["budget"] == 0)
        assert 0 <= result["eval"]["sw"]["metrics"]["mean_recall"] <= 100
    assert results["en_ln_n24_s0"]["cell"].get("parallel") == 0
    assert not (study["out"] / "teachers").exists()  # every student is done: the kept teacher packs are gone
    assert not (study["out"] / "work").exists() or not any((study["out"] / "work").iterdir())


def test_every_student_step_count_is_the_configured_one(study):
    """Equal compute: an epoch goes through the pairs when there are any, else the sentences."""
    from mlilt.studies.cell import epochs_for_steps

    for result in _results(study["out"]).values():
        cell = result["cell"]
        epochs = epochs_for_steps(4, cell["budget"] or cell["parallel"], {"batch_size": 8, "holdout": 0.25})
        assert result["settings"]["epochs"] == epochs


def test_results_and_report_group_cells_by_signal(study):
    out = study["out"]
    rows = json.loads((out / "results.json").read_text())
    assert {row["parallel"] for row in rows} == {0, 20}
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header.index("parallel") == header.index("budget") + 1
    report = (out / "report.md").read_text()
    assert "## Sources of signal" in report and "### sw, `ln`" in report
    for label in ("(a) own pairs only", "(b) parallel only", "(c) pairs + parallel", "(d) en pack, sw queries"):
        assert f"| {label} |" in report, label
    verdict = next(line for line in report.splitlines() if line.startswith("- **20 parallel sentences**"))
    assert "against (a) 16 sw pairs" in verdict and "(b) parallel only" in verdict and "(c) pairs + parallel" in verdict
    assert any(words in verdict for words in ("beats (a)", "below (a)", "not distinguishable from (a)"))
    assert "**In short (sw):** (b) parallel sentences only " in report
    # the mean ± std in the report is the seeds' own numbers
    both = [r["eval"]["sw"]["metrics"]["mean_recall"] for k, r in _results(out).items() if k.startswith("sw_ln_n0_p20")]
    assert f"| (b) parallel only | 0 | 20 | {stat(both)} |" in report
    assert "plots/recall_vs_parallel.png" in report and (out / "plots" / "recall_vs_parallel.png").stat().st_size > 0
    # students never reach the tables of pairs-only cells
    table = next(line for line in report.splitlines() if line.startswith("| `ln` |"))
    assert table.count("|") == 5  # method, trainable %, en n=24, sw n=16


def test_a_student_without_its_teachers_pack_says_which_cell_to_run(study):
    run = _mlilt("bench", "--config", str(study["config"]), "--out", str(study["out"]), "--cell",
                 "sw_ln_n0_p20_s0", "--force")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "teacher cell en_ln_n24_s0" in run.stderr and "--cell en_ln_n24_s0" in run.stderr


def test_a_rerun_retrains_a_teacher_whose_pack_is_gone_before_its_pending_student(study, tmp_path):
    import shutil

    from mlilt.studies.runner import pending_cells

    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    (out / "cells" / "sw_ln_n16_p20_s1.json").unlink()
    config = load_study(study["config"])
    assert [c.id for c in pending_cells(config, out)] == ["en_ln_n24_s1", "sw_ln_n16_p20_s1"]
    run = _mlilt("bench", "--config", str(study["config"]), "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 already done, 2 to run" in run.stdout
    assert "[1/2, " in run.stdout and "[2/2, " in run.stdout and "~0 s left]" in run.stdout  # overall progress
    assert pending_cells(config, out) == [] and not (out / "teachers").exists()
