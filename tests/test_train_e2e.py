"""End to end: the CLI trains real packs on generated demo data; the feature cache means the
image tower runs once per image, not once per epoch or per run."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.data.pairs import read_pairs
from mlilt.evaluation.pairs_eval import evaluate_pairs
from mlilt.towers.registry import register_tower
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import tiny_text_tower, tiny_timm_cnn

runner = CliRunner()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(out, ["en", "sw"], n=300, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-demo") / "data"
    generate_demo(out, ["en", "sw"], n=80, seed=0, image_size=32)
    return out


@pytest.mark.slow
def test_cli_train_on_offline_towers_learns_swahili(demo_data, tmp_path):
    """Held-out recall@1 after training is at least 5x chance (real towers, real files)."""
    out = tmp_path / "langpacks" / "sw"
    # The text side trains (ln + adapters); the image tower stays frozen so its features are
    # cached and this test stays within CI time. The default method is exercised by `mlilt demo`.
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(demo_data / "sw" / "train.jsonl"),
                                 "--out", str(out), "--method", "ln@text+adapter", "--epochs", "3",
                                 "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert (out / "langpack.json").is_file() and (out / "langpack.safetensors").is_file()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]

    model = mlilt.load(out)
    assert model.encode_text(["mbwa anakimbia"], lang="sw").shape == (1, 256)
    test = read_pairs(demo_data / "sw" / "test.jsonl", lang="sw")
    metrics = evaluate_pairs(model.texts["sw"], model.image, test)
    chance = 100.0 / len({p.image for p in test})
    assert metrics["image_retrieval_recall@1"] >= 5 * chance, metrics
    assert metrics["text_retrieval_recall@1"] >= 5 * chance, metrics


def _tiny_config(data, out, **overrides) -> TrainConfig:
    settings = dict(lang="sw", data=str(data / "sw" / "train.jsonl"), out=str(out), text_tower="tiny-bert-0",
                    image_tower="tiny-timm-cnn", epochs=3, batch_size=8)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def tiny_towers():
    text, image = tiny_text_tower(), tiny_timm_cnn()
    register_tower(text)
    register_tower(image)
    return text, image


def test_feature_cache_hit_on_later_epochs_and_runs(tiny_demo_data, tmp_path, tiny_towers):
    _, image_tower = tiny_towers
    first = train(_tiny_config(tiny_demo_data, tmp_path / "a", method="ln@text"))
    calls_after_first = image_tower.calls.count
    assert first.pack.is_dir()
    images = {p.image for p in read_pairs(tiny_demo_data / "sw" / "train.jsonl")}
    batches_needed = -(-len(images) // 32) + 1  # the train and val feature passes
    assert 0 < calls_after_first <= batches_needed  # one pass over the images, not one per epoch

    train(_tiny_config(tiny_demo_data, tmp_path / "b", method="lora", seed=1))
    assert image_tower.calls.count == calls_after_first  # second run: every feature from disk


def test_training_the_image_side_runs_the_tower_every_epoch(tiny_demo_data, tmp_path, tiny_towers):
    _, image_tower = tiny_towers
    train(_tiny_config(tiny_demo_data, tmp_path / "a", method="ln", epochs=1))
    one_epoch = image_tower.calls.count
    train(_tiny_config(tiny_demo_data, tmp_path / "b", method="ln", epochs=2))
    assert image_tower.calls.count - one_epoch > one_epoch  # no cache when the tower trains


def test_cli_refuses_to_overwrite_a_finished_pack(tiny_demo_data, tmp_path, tiny_towers):
    out = tmp_path / "sw"
    train(_tiny_config(tiny_demo_data, out, epochs=1))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(out), "--text-tower", "tiny-bert-0", "--image-tower",
                                 "tiny-timm-cnn", "--epochs", "1"])
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_cli_bad_data_exits_with_a_message_and_writes_nothing(tmp_path, tiny_towers):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "mraba"}\n')
    out = tmp_path / "pack"
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(bad), "--out", str(out),
                                 "--text-tower", "tiny-bert-0", "--image-tower", "tiny-timm-cnn"])
    assert result.exit_code == 3, result.output
    assert "pairs.jsonl:1" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_lang_without_rows_names_the_languages_present(tiny_demo_data, tmp_path, tiny_towers):
    result = runner.invoke(app, ["train", "--lang", "bn", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(tmp_path / "p"), "--text-tower", "tiny-bert-0",
                                 "--image-tower", "tiny-timm-cnn"])
    assert result.exit_code == 3
    assert "bn" in result.output and "sw" in result.output


def test_cli_unknown_method_is_a_usage_error(tiny_demo_data, tmp_path):
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(tmp_path / "p"), "--method", "ln+prompt"])
    assert result.exit_code == 2
    assert "prompt" in result.output and "known" in result.output


def test_train_help_says_which_sides_each_method_touches():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for line in ("ln (text+image)", "full-text (text)", "head (projections only)"):
        assert line in result.output
