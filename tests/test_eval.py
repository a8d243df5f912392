"""mlilt eval: packs on retrieval sets, image tower run once per image side for all languages."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.errors import UsageError
from mlilt.evaluation.evaluate import evaluate
from mlilt.evaluation.runner import plan_languages
from mlilt.towers.registry import register_tower
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import TINY_CLIP, ForwardCalls, tiny_text_tower, tiny_timm_vit

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packs(tmp_path_factory, one_thread):
    text, image = tiny_text_tower(), tiny_timm_vit()
    register_tower(text)
    register_tower(image)
    root = tmp_path_factory.mktemp("eval")
    generate_demo(root / "data", ["en", "sw", "de"], n=50, image_size=32)
    common = dict(text_tower=text.spec, image_tower=image.spec, epochs=1, batch_size=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLILT_CACHE", str(root / "cache"))
        train(TrainConfig(lang="sw", data=str(root / "data/sw/train.jsonl"), out=str(root / "packs/sw"), **common))
        train(TrainConfig(lang="en", data=str(root / "data/en/train.jsonl"), out=str(root / "packs/en"),
                          anchor=str(root / "packs/sw"), method="lora", **common))
    return root, image


def test_folder_of_packs_each_on_its_own_language_with_one_image_pass(packs):
    root, image_tower = packs
    calls = ForwardCalls(image_tower)
    results = evaluate("demo", [str(root / "packs")], root=str(root / "data"))
    assert sorted((r.language, r.model) for r in results) == [("en", "en"), ("sw", "sw")]
    test_images = len((root / "data/sw/test.jsonl").read_text().splitlines())
    assert test_images <= 32  # so one feature batch holds them all
    # Two languages, two packs on one anchor: the images go through the tower once.
    assert calls.count == 1
    for r in results:
        assert set(r.metrics) >= {"image_retrieval_recall@1", "text_retrieval_recall@10", "mean_recall"}
        assert 0 <= r.metrics["mean_recall"] <= 100


def test_one_pack_on_several_languages_is_cross_lingual_transfer(packs):
    root, image_tower = packs
    results = evaluate("demo", [str(root / "packs/sw")], root=str(root / "data"), langs=["all"])
    assert sorted(r.language for r in results) == ["de", "en", "sw"]
    assert {r.model for r in results} == {"sw"}


def test_plan_languages_rules():
    assert plan_languages(["sw"], None, ["en", "sw"]) == {0: ["sw"]}
    assert plan_languages(["sw"], ["en"], ["en", "sw"]) == {0: ["en"]}
    assert plan_languages(["sw", "en"], ["all"], ["en", "sw", "de"]) == {0: ["sw"], 1: ["en"]}
    assert plan_languages(["sw", "en"], ["en"], ["en", "sw"]) == {1: ["en"]}
    with pytest.raises(UsageError, match="nothing to evaluate"):
        plan_languages(["bn"], None, ["en", "sw"])


def test_cli_writes_clip_benchmark_json_and_csv(packs, tmp_path):
    root, _ = packs
    out = tmp_path / "results"
    result = runner.invoke(app, ["eval", "--benchmark", "demo", "--root", str(root / "data"),
                                 "--pack", str(root / "packs/sw"), "--langs", "sw,de", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "demo_sw_sw.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
    assert record["dataset"] == "demo" and record["language"] == "sw"
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("benchmark,language,model") and len(lines) == 3


def test_cli_unknown_language_names_what_exists(packs, tmp_path):
    root, _ = packs
    result = runner.invoke(app, ["eval", "--benchmark", "demo", "--root", str(root / "data"),
                                 "--pack", str(root / "packs/sw"), "--langs", "xx", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "xx" in result.output and "sw" in result.output
    assert not (tmp_path / "r").exists()


def test_all_36_xm3600_languages_cost_one_image_tower_pass(packs, tmp_path):
    from test_benchmarks import XM_LANGS, _write_xm3600

    root, image_tower = packs
    _write_xm3600(tmp_path)
    calls = ForwardCalls(image_tower)
    with pytest.warns(UserWarning, match="images_missing_on_disk"):
        results = evaluate("xm3600", [str(root / "packs/sw")], root=str(tmp_path), langs=["all"])
    assert sorted(r.language for r in results) == sorted(XM_LANGS)
    assert calls.count == 1  # 4 images on disk, every language
    german = next(r for r in results if r.language == "de")
    assert german.counts["images_missing_on_disk"] == 1 and german.counts["images_without_language"] == 2


def test_cli_reports_what_the_benchmark_left_out(packs, tmp_path):
    from test_benchmarks import _write_xm3600

    root, _ = packs
    _write_xm3600(tmp_path)
    result = runner.invoke(app, ["eval", "--benchmark", "xm3600", "--root", str(tmp_path), "--pack",
                                 str(root / "packs/sw"), "--langs", "de,sw", "--captions", "all"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "images_missing_on_disk=1" in result.output and "images_without_language=2" in result.output


@pytest.fixture
def tiny_open_clip(tmp_path):
    import open_clip

    (tmp_path / "mlilt-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path)
    return "mlilt-tiny-clip:"  # empty PRETRAINED: random weights, nothing to download


def test_reference_open_clip_model_runs_through_the_same_code(packs, tiny_open_clip):
    root, _ = packs
    results = evaluate("demo", [str(root / "packs/sw")], root=str(root / "data"), references=[tiny_open_clip])
    assert [(r.language, r.model) for r in results] == [("sw", "sw"), ("sw", "mlilt-tiny-clip")]
    torch.manual_seed(0)  # the tiny reference has random weights: the same ones in both runs
    alone = evaluate("demo", [], root=str(root / "data"), langs=["sw", "en"], references=[tiny_open_clip])
    assert sorted(r.language for r in alone) == ["en", "sw"]
    torch.manual_seed(0)
    sw_only = evaluate("demo", [], root=str(root / "data"), langs=["sw"], references=[tiny_open_clip])
    assert alone[[r.language for r in alone].index("sw")].metrics == sw_only[0].metrics
    with pytest.raises(UsageError, match="--langs"):
        evaluate("demo", [], root=str(root / "data"), references=[tiny_open_clip])


def _zeroshot_tree(root, labels_file=False):
    from PIL import Image

    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    rows = []
    for class_id, rgb in colours.items():
        for i in range(3):
            path = root / "images" / class_id / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), tuple(max(0, c - 10 * i) for c in rgb)).save(path)
            rows.append({"image": f"images/{class_id}/{i}.png", "label": class_id})
    (root / "classnames").mkdir()
    (root / "classnames" / "sw.txt").write_text("red\tnyekundu\nblue\tbluu\ngreen\tkijani\n")
    (root / "templates").mkdir()
    (root / "templates" / "sw.txt").write_text("picha ya {}\nrangi {}\n")
    if labels_file:
        (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    return root


def test_zeroshot_accuracy_matches_a_hand_count():
    from mlilt.evaluation.zeroshot import accuracy

    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.1]])
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    metrics = accuracy(images, weights, [0, 1, 2, 2])
    # top-1 predictions: 0, 1, 2, 0 -> 3 of 4 right; class recalls 1, 1, 1/2
    assert metrics["acc1"] == pytest.approx(75.0)
    assert metrics["acc5"] == pytest.approx(100.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)


@pytest.mark.parametrize("labels_file", [False, True])
def test_zeroshot_benchmark_through_the_cli(packs, tmp_path, labels_file):
    root, _ = packs
    tree = _zeroshot_tree(tmp_path / "zs", labels_file)
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--benchmark", "zeroshot", "--root", str(tree), "--pack",
                                 str(root / "packs/sw"), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "zeroshot_sw_sw.json").read_text())
    assert record["task"] == "zeroshot_classification"
    assert 0 <= record["metrics"]["acc1"] <= record["metrics"]["acc5"] <= 100


def test_zeroshot_bad_classnames_file_names_the_line(packs, tmp_path):
    root, _ = packs
    tree = _zeroshot_tree(tmp_path / "zs")
    (tree / "classnames" / "sw.txt").write_text("red nyekundu\n")
    result = runner.invoke(app, ["eval", "--benchmark", "zeroshot", "--root", str(tree), "--pack",
                                 str(root / "packs/sw")])
    assert result.exit_code == 3
    assert "sw.txt:1" in result.output


def test_custom_data_without_a_lang_field_points_to_langs_und(packs, tmp_path):
    root, _ = packs
    rows = [json.loads(line) for line in (root / "data/sw/test.jsonl").read_text().splitlines()]
    data = tmp_path / "nolang.jsonl"
    data.write_text("".join(json.dumps({"image": str((root / "data/sw" / r["image"]).resolve()),
                                        "caption": r["caption"]}) + "\n" for r in rows))
    with pytest.raises(UsageError, match="no lang field.*--langs und"):
        evaluate("custom", [str(root / "packs/sw")], data=str(data))
    results = evaluate("custom", [str(root / "packs/sw")], data=str(data), langs=["und"])
    assert [r.language for r in results] == ["und"], results
    assert 0 < results[0].metrics["mean_recall"] <= 100
