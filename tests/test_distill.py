"""Learning a language from parallel text: a student distilled from a teacher pack lives in the
teacher's image space, retrieves images with no image of its language seen, and never reuses
another teacher's cached embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.data.pairs import read_pairs
from mlilt.demo.data import caption_scene, generate_demo, make_scenes
from mlilt.errors import UsageError
from mlilt.evaluation.pairs_eval import evaluate_pairs
from mlilt.packs import read_pack
from mlilt.training import TrainConfig, train
from mlilt.training.teachers import load_teacher, teacher_embeddings
from tiny_towers import train_tiny_pack

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_parallel_tsv(path: Path, n: int, seed: int) -> Path:
    """English<TAB>Swahili captions of ``n`` demo scenes that have no images anywhere."""
    scenes = make_scenes(n, seed=seed, image_size=32)
    lines = [f"{caption_scene(s, 'en', seed)}\t{caption_scene(s, 'sw', seed)}" for s in scenes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_teacher(tiny_cnn_towers, tmp_path_factory):
    """An English pack on the tiny towers, trained on tiny demo pairs: the teacher."""
    return train_tiny_pack(tmp_path_factory.mktemp("teacher"), "en")


def _student(tmp_path, teacher, parallel, **overrides) -> TrainConfig:
    settings = dict(lang="sw", data=None, out=str(tmp_path / "sw"), parallel=(str(parallel),), teacher=str(teacher),
                    text_tower="tiny-bert-0", image_tower="tiny-timm-cnn", embed_dim=16, epochs=2, batch_size=8,
                    method="ln", checkpoint_every=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_student_from_parallel_text_alone_lives_in_its_teachers_image_space(tiny_teacher, tmp_path):
    parallel = write_parallel_tsv(tmp_path / "en_sw.tsv", 60, seed=3)
    result = train(_student(tmp_path, tiny_teacher, parallel))
    teacher, student = read_pack(tiny_teacher), read_pack(result.pack)
    assert student.config.anchor == {"name": str(tiny_teacher), "image_side_id": teacher.config.image_side_id}
    assert student.config.image_side_id == teacher.config.image_side_id
    for name, tensor in teacher.side_tensors("image").items():
        assert torch.equal(student.side_tensors("image")[name], tensor), name
    assert student.config.data["teacher"]["spec"] == str(tiny_teacher)
    assert student.config.data["parallel"]["pairs"] == 60
    history = [json.loads(line) for line in (result.pack / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert {"mean_recall", "target_to_source_recall@1", "distance"} <= set(history[-1]["val"])
    # one model of both: the student's Swahili next to the teacher's English, one image space
    model = mlilt.load(tiny_teacher, result.pack)
    assert model.languages == ["en", "sw"]
    assert model.encode_text(["duara nyekundu"], lang="sw").shape == (1, 16)


def test_every_distill_loss_trains_with_and_without_image_pairs(tiny_teacher, tmp_path):
    parallel = write_parallel_tsv(tmp_path / "en_sw.tsv", 40, seed=4)
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    for loss in ("mse", "contrastive", "both"):
        result = train(_student(tmp_path, tiny_teacher, parallel, distill_loss=loss, out=str(tmp_path / loss)))
        assert result.history[-1]["loss"] > 0
    both = train(_student(tmp_path, tiny_teacher, parallel, data=str(tmp_path / "data" / "sw" / "train.jsonl"),
                          distill_weight=0.5, out=str(tmp_path / "pairs-too")))
    val = both.history[-1]["val"]
    assert {"image_retrieval_recall@1", "distill_target_to_source_recall@1", "distill_distance"} <= set(val)
    assert read_pack(both.pack).config.data["parallel"]["pairs"] == 40


def test_teacher_embeddings_are_computed_once_per_teacher_and_sentence(tiny_teacher, tmp_path):
    sentences = ["a red circle", "a blue square", "a red circle left"]
    teacher = load_teacher(str(tiny_teacher))
    first = teacher_embeddings(teacher, sentences, cache_root=tmp_path / "cache")
    again_teacher = load_teacher(str(tiny_teacher))
    calls = []
    encode = again_teacher.encode
    again_teacher.encode = lambda texts, batch_size=64: calls.append(list(texts)) or encode(texts, batch_size)
    again = teacher_embeddings(again_teacher, sentences + ["a star"], cache_root=tmp_path / "cache")
    assert calls == [["a star"]]  # only the new sentence is computed
    torch.testing.assert_close(again[:3], first)
    torch.testing.assert_close(first, teacher.encode(sentences))
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-5)


def test_a_changed_teacher_never_reuses_the_old_teachers_embeddings(tiny_teacher, tmp_path):
    recorded = read_pack(tiny_teacher).config.training
    retrained = TrainConfig(**{**{k: v for k, v in recorded.items() if k in TrainConfig.defaults()}, "seed": 1,
                               "lang": "en",
                               "data": str(tiny_teacher.parent / "data" / "en" / "train.jsonl"),
                               "out": str(tmp_path / "en-seed1")})
    other = load_teacher(str(train(retrained).pack))
    teacher = load_teacher(str(tiny_teacher))
    assert other.fingerprint() != teacher.fingerprint()
    sentences = ["a red circle", "a blue square"]
    teacher_embeddings(teacher, sentences, cache_root=tmp_path / "cache")
    calls = []
    encode = other.encode
    other.encode = lambda texts, batch_size=64: calls.append(list(texts)) or encode(texts, batch_size)
    rows = teacher_embeddings(other, sentences, cache_root=tmp_path / "cache")
    assert calls == [sentences]
    torch.testing.assert_close(rows, encode(sentences))


def test_distillation_options_are_checked_before_any_work(tiny_teacher, tmp_path):
    with pytest.raises(UsageError, match="--data .*--parallel"):
        TrainConfig(lang="sw", data=None, out="o")
    with pytest.raises(UsageError, match="--parallel needs --teacher"):
        TrainConfig(lang="sw", data=None, out="o", parallel=("p.tsv",))
    with pytest.raises(UsageError, match="--distill-loss"):
        TrainConfig(lang="sw", data=None, out="o", parallel=("p.tsv",), teacher="t", distill_loss="kl")
    parallel = write_parallel_tsv(tmp_path / "en_sw.tsv", 20, seed=5)
    with pytest.raises(UsageError, match="--embed-dim 8 conflicts .* 16 wide"):
        train(_student(tmp_path, tiny_teacher, parallel, embed_dim=8, anchor=None))
    with pytest.raises(UsageError, match="not a folder"):
        load_teacher(str(tmp_path / "no-such-pack"))
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_cli_distils_swahili_from_the_english_pack_with_no_swahili_image(tmp_path):
    """Offline towers: a Swahili pack from English-Swahili sentences and the committed English
    pack retrieves Swahili test images at 5x chance, better than the English pack does with
    Swahili queries."""
    parallel = write_parallel_tsv(tmp_path / "en_sw.tsv", 1000, seed=7)
    generate_demo(tmp_path / "demo", ["sw"], n=300, seed=0)
    out = tmp_path / "sw"
    result = runner.invoke(app, ["train", "--lang", "sw", "--teacher", str(REPO / "langpacks" / "en"),
                                 "--parallel", str(parallel), "--out", str(out), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    test = read_pairs(tmp_path / "demo" / "sw" / "test.jsonl", lang="sw")
    chance = 100.0 / len({p.image for p in test})
    student = mlilt.load(out)
    english = mlilt.load(REPO / "langpacks" / "en")
    distilled = evaluate_pairs(student.texts["sw"], student.image, test)
    untaught = evaluate_pairs(english.texts["en"], english.image, test)
    assert distilled["image_retrieval_recall@1"] >= 5 * chance, distilled
    assert distilled["mean_recall"] > untaught["mean_recall"] + 5, (distilled, untaught)
