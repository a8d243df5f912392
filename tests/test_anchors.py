"""Aligned-CLIP anchors and teachers: a pack on an open_clip model keeps that model's image
embeddings exactly; open_clip and sentence-transformers models teach students from parallel text."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.demo.data import caption_scene, generate_demo, make_scenes
from mlilt.errors import MliltError, UsageError
from mlilt.evaluation.evaluate import evaluate
from mlilt.packs import read_pack
from mlilt.training import TrainConfig, train
from mlilt.training.teachers import OpenClipTeacher, SentenceTransformerTeacher, load_teacher
from tiny_towers import save_tiny_open_clip, save_tiny_text_tower

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cnn_towers")
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random open_clip model saved as a weights file: (spec, the open_clip model, its preprocess)."""
    import open_clip

    spec = save_tiny_open_clip(tmp_path_factory.mktemp("clip"))
    name, _, weights = spec.partition(":")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    return spec, model.eval(), preprocess


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(root, ["sw", "en"], n=40, image_size=32)
    return root


def _config(tmp_path, name: str, **settings) -> TrainConfig:
    base = dict(lang="sw", data=None, out=str(tmp_path / name), text_tower="tiny-bert-0", epochs=1, batch_size=8,
                method="ln", checkpoint_every=0)
    return TrainConfig(**{**base, **settings})


def _parallel(path, n: int = 40, seed: int = 3):
    scenes = make_scenes(n, seed=seed, image_size=32)
    path.write_text("".join(f"{caption_scene(s, 'en', seed)}\t{caption_scene(s, 'sw', seed)}\n" for s in scenes))
    return path


def _images(demo, n: int = 6) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((demo / "images").glob("*.png"))[:n]]


def test_a_pack_on_an_open_clip_anchor_gives_open_clips_image_embeddings(clip, demo, tmp_path):
    spec, model, preprocess = clip
    result = train(_config(tmp_path, "sw", data=str(demo / "sw" / "train.jsonl"), anchor=spec))
    pack = read_pack(result.pack)
    assert pack.config.anchor["name"] == spec and pack.config.embed_dim == 16
    assert pack.config.towers["image"]["spec"] == spec and pack.config.image_method == "head"
    loaded = mlilt.load(result.pack)
    images = _images(demo)
    pixels = torch.stack([loaded.image.tower.preprocess(im) for im in images])
    with torch.no_grad():
        expected = F.normalize(model.encode_image(pixels), dim=-1)
        assert torch.equal(loaded.image(pixels), expected)  # bit for bit on the same pixels
        # and through each library's own preprocessing, from PIL images
        theirs = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
    torch.testing.assert_close(loaded.encode_image(images), theirs, atol=1e-5, rtol=1e-5)


def test_packs_on_one_open_clip_anchor_share_one_image_space_with_the_model(clip, demo, tmp_path):
    spec, _, _ = clip
    sw = train(_config(tmp_path, "sw", data=str(demo / "sw" / "train.jsonl"), anchor=spec)).pack
    en = train(_config(tmp_path, "en", lang="en", data=str(demo / "en" / "train.jsonl"), anchor=spec, seed=1)).pack
    assert read_pack(sw).config.image_side_id == read_pack(en).config.image_side_id
    assert sorted(mlilt.load(sw, en).languages) == ["en", "sw"]
    together = evaluate("demo", [str(sw)], root=str(demo), references=[spec])
    alone = evaluate("demo", [], root=str(demo), langs=["sw"], references=[spec])
    assert [r.metrics for r in together if r.model != "sw"] == [r.metrics for r in alone]


def test_a_pack_refuses_an_anchor_whose_weights_changed(clip, demo, tmp_path):
    spec, _, _ = clip
    folder = tmp_path / "changing"
    moving = save_tiny_open_clip(folder, seed=1)
    pack = train(_config(tmp_path, "sw", data=str(demo / "sw" / "train.jsonl"), anchor=moving)).pack
    gc.collect()  # the registry holds loaded towers weakly: the next load reads the file again
    save_tiny_open_clip(folder, seed=2)
    (folder / "weights-2.pt").replace(folder / "weights-1.pt")
    with pytest.raises(MliltError, match="fingerprint"):
        mlilt.load(pack).encode_image(_images(demo, n=1))


def test_anchor_conflicts_are_refused_before_any_work(clip, demo, tmp_path):
    spec, _, _ = clip
    pairs = str(demo / "sw" / "train.jsonl")
    with pytest.raises(UsageError, match="--image-tower tiny-timm-cnn conflicts"):
        train(_config(tmp_path, "a", data=pairs, anchor=spec, image_tower="tiny-timm-cnn"))
    with pytest.raises(UsageError, match="--embed-dim 8 conflicts"):
        train(_config(tmp_path, "b", data=pairs, anchor=spec, embed_dim=8))
    with pytest.raises(UsageError, match="open_clip model MODEL:PRETRAINED"):
        train(_config(tmp_path, "c", data=pairs, anchor=str(tmp_path / "no-such-pack")))
    with pytest.raises(UsageError, match="not an open_clip model"):
        train(_config(tmp_path, "d", data=pairs, anchor="no-such-model:openai"))
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_an_open_clip_teacher_gives_its_normalised_encode_text_and_anchors_the_student(clip, demo, tmp_path):
    import open_clip

    spec, model, _ = clip
    teacher = load_teacher(spec)
    assert isinstance(teacher, OpenClipTeacher) and teacher.anchor == spec and teacher.width == 16
    sentences = ["a red circle", "duara nyekundu na mraba"]
    tokens = open_clip.get_tokenizer(spec.partition(":")[0])(sentences)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode(sentences), F.normalize(model.encode_text(tokens), dim=-1))
    other = load_teacher(save_tiny_open_clip(tmp_path / "other", seed=5))
    assert other.fingerprint() != teacher.fingerprint()

    parallel = _parallel(tmp_path / "en_sw.tsv")
    result = train(_config(tmp_path, "sw", parallel=(str(parallel),), teacher=spec, epochs=2))
    pack = read_pack(result.pack)
    assert pack.config.anchor["name"] == spec and pack.config.data["teacher"]["spec"] == spec
    images = _images(demo)
    with torch.no_grad():
        pixels = torch.stack([mlilt.load(result.pack).image.tower.preprocess(im) for im in images])
        assert torch.equal(mlilt.load(result.pack).image(pixels), F.normalize(model.encode_image(pixels), dim=-1))
    assert result.history[-1]["val"]["distance"] < result.history[0]["val"]["distance"]


@pytest.fixture(scope="module")
def sentence_transformer(tmp_path_factory):
    """A tiny sentence-transformers model saved by the library: BERT, mean pooling, Dense to 16, Normalize."""
    from sentence_transformers import SentenceTransformer, models

    root = tmp_path_factory.mktemp("st")
    save_tiny_text_tower(root / "bert")
    word = models.Transformer(str(root / "bert"))
    width = getattr(word, "get_embedding_dimension", word.get_word_embedding_dimension)()
    pooling = models.Pooling(width, pooling_mode="mean")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = models.Dense(width, 16)
    SentenceTransformer(modules=[word, pooling, dense, models.Normalize()], device="cpu").save(str(root / "st"))
    return root / "st"


def test_a_sentence_transformers_teacher_needs_an_image_space_and_teaches_on_an_anchor(
        sentence_transformer, clip, demo, tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher = load_teacher(str(sentence_transformer))
    assert isinstance(teacher, SentenceTransformerTeacher) and teacher.anchor is None and teacher.width == 16
    sentences = ["a red circle", "a small blue square"]
    expected = SentenceTransformer(str(sentence_transformer), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(teacher.encode(sentences), F.normalize(expected, dim=-1))

    parallel = str(_parallel(tmp_path / "en_sw.tsv"))
    with pytest.raises(UsageError, match="has no image space: pass --anchor"):
        train(_config(tmp_path, "alone", parallel=(parallel,), teacher=str(sentence_transformer)))
    assert not (tmp_path / "alone").exists()
    spec, _, _ = clip
    on_clip = train(_config(tmp_path, "on-clip", parallel=(parallel,), teacher=str(sentence_transformer), anchor=spec))
    assert read_pack(on_clip.pack).config.anchor["name"] == spec
    # with image pairs and no anchor, the pack learns its own image space in the teacher's width
    own = train(_config(tmp_path, "own", parallel=(parallel,), teacher=str(sentence_transformer),
                        data=str(demo / "sw" / "train.jsonl")))
    assert read_pack(own.pack).config.anchor is None and read_pack(own.pack).config.embed_dim == 16


def test_the_cli_trains_on_an_open_clip_teacher_and_names_what_a_teacher_can_be(clip, tmp_path):
    spec, _, _ = clip
    parallel = _parallel(tmp_path / "en_sw.tsv")
    out = tmp_path / "sw"
    result = runner.invoke(app, ["train", "--lang", "sw", "--teacher", spec, "--parallel", str(parallel), "--out",
                                 str(out), "--text-tower", "tiny-bert-0", "--epochs", "1", "--batch-size", "8",
                                 "--method", "ln", "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    assert read_pack(out).config.anchor["name"] == spec
    bad = runner.invoke(app, ["train", "--lang", "sw", "--teacher", "nothing-here", "--parallel", str(parallel),
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0
    assert "open_clip model MODEL:PRETRAINED" in bad.output and "sentence-transformers" in bad.output
