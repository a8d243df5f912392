"""Language packs made by the real training path: round trips, tower checks, damaged files,
several packs in one model, and finding packs by name.

Packs are trained once per module on tiny towers (a 2-layer BERT and a 2-layer timm ViT,
registered under their specs) and tiny demo data, then copied into each test's own folder
before anything is changed.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mlilt
from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.data.pairs import read_pairs
from mlilt.modeling.encode import encode_texts
from mlilt.errors import PackError, UsageError
from mlilt.modeling.model import ContrastiveModel, SideEncoder
from mlilt.packs import (FORMAT_VERSION, INDEX_FILE, PACK_CONFIG, PACK_TENSORS, PackConfig, read_pack, side_id,
                         save_pack)
from mlilt.towers.registry import registered
from mlilt.training.callbacks import Callback
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import tiny_text_tower, tiny_timm_vit

EMBED_DIM = 16
TEXT_SPEC, IMAGE_SPEC = "tiny-bert-0", "tiny-timm-vit"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
CAPTIONS = ["a large red circle", "small blue square and green star", "duara nyekundu kubwa", "mraba ndogo na",
            "triangle", "left top right bottom yellow"]


# --------------------------------------------------------------------------- module set-up


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def towers():
    """The tiny towers, registered under their specs for this module; restored afterwards."""
    text, image = tiny_text_tower(), tiny_timm_vit()
    assert (text.spec, image.spec) == (TEXT_SPEC, IMAGE_SPEC)
    with registered(text, image):  # whatever was registered under these specs comes back after
        yield {"text": text, "image": image}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("packs-module")


@pytest.fixture(scope="module")
def demo(root):
    return generate_demo(root / "demo", ["en", "sw"], n=60, image_size=32)


def _train(root: Path, demo, lang: str, out: str, **overrides):
    """train() with a module-level cache; returns (pack path, the in-memory model, its PackConfig)."""
    config = TrainConfig(lang=lang, data=str(demo.files(lang)["train"]), out=str(root / out), text_tower=TEXT_SPEC,
                         image_tower=IMAGE_SPEC, embed_dim=EMBED_DIM, epochs=1, batch_size=8, **overrides)
    built = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLILT_CACHE", str(root / "cache"))
        mp.setenv("MLILT_PACKS", str(root / "no-packs-here"))
        result = train(config, callbacks=[_ModelKept(built)])
    assert result.pack == Path(config.out)
    return result.pack, built[0], read_pack(result.pack).config


class _ModelKept(Callback):
    """Keeps the model a run builds (it ends holding the weights the pack saved)."""

    def __init__(self, into: list):
        self.into = into

    def on_model_built(self, model, report) -> None:
        self.into.append(model)


@pytest.fixture(scope="module")
def sw(root, demo, towers):
    """A Swahili pack, method ln+adapter: both towers train."""
    return _train(root, demo, "sw", "sw", method="ln+adapter")


@pytest.fixture(scope="module")
def en(root, demo, towers, sw):
    """An English pack trained against the Swahili pack's image side (text-only LoRA)."""
    return _train(root, demo, "en", "en", method="lora", anchor=str(sw[0]))


@pytest.fixture(scope="module")
def en_elsewhere(root, demo, towers):
    """An English pack trained on its own, with another seed: its own image space."""
    return _train(root, demo, "en", "en-unanchored", method="ln+adapter", seed=1)  # as sw, but another seed


@pytest.fixture(scope="module")
def images(demo):
    return [Image.open(path).convert("RGB") for path in sorted((demo.out / "images").glob("*.png"))[:6]]


def _copy_pack(pack: Path, dest: Path) -> Path:
    shutil.copytree(pack, dest)
    return dest


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@torch.no_grad()
def _image_embeddings(encoder, images) -> torch.Tensor:
    return encoder(torch.stack([encoder.tower.preprocess(im) for im in images]))


# --------------------------------------------------------------------------- round trips


def test_trained_pack_round_trip_is_exact(sw, images):
    path, model, _ = sw
    pack = read_pack(path)
    expected = model.pack_state()
    assert pack.tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert pack.tensors[name].dtype == value.dtype and torch.equal(pack.tensors[name], value.detach()), name
    # the pack holds the method's tensors and projections only, no frozen tower weight
    assert not any("word_embeddings" in name or "base_layer" in name for name in pack.tensors)
    # training moved the adapters off the identity: the round trip is not trivially exact
    ups = [v for k, v in pack.tensors.items() if k.startswith("text.") and k.endswith("adapter.up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)

    loaded = mlilt.load(path)
    assert loaded.languages == ["sw"]
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode_text(CAPTIONS, lang="sw"), encode_texts(model.text, CAPTIONS))
    assert torch.equal(loaded.encode_image(images), _image_embeddings(model.image, images))
    features = torch.randn(5, model.text.tower.width)
    with torch.no_grad():
        assert torch.equal(loaded.texts["sw"].project(features), model.text.project(features))
        assert torch.equal(loaded.image.project(features), model.image.project(features))
    assert loaded.logit_scale == pytest.approx(float(model.scale().detach()), rel=1e-6)


@pytest.mark.parametrize("method", ["ln+adapter", "lora:4", "adapter:8+bitfit@text", "ln+adapter+top:1"])
def test_random_method_tensors_round_trip(towers, tmp_path, images, method):
    """Adapters and LoRA start as the identity; with random values a load that ignored them
    (or put them in the wrong place) gives other embeddings."""
    sides, _ = build_sides(towers, method, EMBED_DIM, seed=3)
    model = ContrastiveModel(sides["text"], sides["image"])
    identity = {"text": encode_texts(model.text, CAPTIONS), "image": _image_embeddings(model.image, images)}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.pack_state().items():
            if name != "logit_scale":
                param.copy_(param + 0.3 * torch.randn(param.shape, generator=generator))
    wanted = {"text": encode_texts(model.text, CAPTIONS), "image": _image_embeddings(model.image, images)}
    for side in ("text", "image"):
        assert not torch.allclose(wanted[side], identity[side], atol=1e-3), f"{side}: method tensors had no effect"

    path = save_pack(tmp_path / "pack", model, PackConfig.for_model(model, "sw", method))
    loaded = mlilt.load(path)
    assert torch.equal(loaded.encode_text(CAPTIONS, lang="sw"), wanted["text"])
    assert torch.equal(loaded.encode_image(images), wanted["image"])


# --------------------------------------------------------------------------- other towers


def test_pack_on_another_text_tower_is_refused(sw):
    path, model, config = sw
    other = tiny_text_tower(seed=1)
    other.spec = TEXT_SPEC  # same name, other weights
    with registered(other), pytest.raises(PackError) as error:
        mlilt.load(path)
    message = str(error.value)
    recorded = config.towers["text"]["fingerprint"]
    assert recorded != other.fingerprint()
    assert recorded[:12] in message and other.fingerprint()[:12] in message
    assert f"text tower {TEXT_SPEC!r}" in message and str(path) in message


def test_pack_on_another_image_tower_is_refused(sw):
    path, _, config = sw
    other = tiny_timm_vit()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # one weight nudged: a different tower
    with registered(other):
        model = mlilt.load(path)  # the text side is fine; the image side is checked when first built
        with pytest.raises(PackError) as error:
            model.encode_image([Image.new("RGB", (32, 32))])
    message = str(error.value)
    assert config.towers["image"]["fingerprint"][:12] in message and other.fingerprint()[:12] in message
    assert f"image tower {IMAGE_SPEC!r}" in message


# --------------------------------------------------------------------------- writing over packs


def test_save_pack_never_replaces_without_overwrite(sw, tmp_path):
    path, model, config = sw
    pack = _copy_pack(path, tmp_path / "p")
    before = _file_bytes(pack)
    with pytest.raises(UsageError, match="already holds a pack"):
        save_pack(pack, model, copy.deepcopy(config))
    assert _file_bytes(pack) == before

    not_a_pack = tmp_path / "other"
    not_a_pack.mkdir()
    (not_a_pack / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a pack folder"):
        save_pack(not_a_pack, model, copy.deepcopy(config))
    assert _file_bytes(not_a_pack) == {"notes.txt": b"mine"}

    save_pack(pack, model, copy.deepcopy(config), overwrite=True)
    # same model, same tensors (not byte-compared: safetensors writes its metadata in hash order)
    rewritten, original = load_file(str(pack / PACK_TENSORS)), load_file(str(sw[0] / PACK_TENSORS))
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "p"]  # no staging folders left behind


def test_train_refuses_an_existing_pack_before_any_work(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")
    before = _file_bytes(pack)
    # data and towers that any work would fail on: only the --out check can answer first
    config = TrainConfig(lang="sw", data=str(tmp_path / "no-such-pairs.jsonl"), out=str(pack),
                         text_tower=str(tmp_path / "no-text-tower"), image_tower="timm:no-such-model",
                         embed_dim=EMBED_DIM, epochs=1, batch_size=8)
    with pytest.raises(UsageError, match="already holds a pack"):
        train(config)
    assert _file_bytes(pack) == before


# --------------------------------------------------------------------------- several packs


def test_anchored_packs_load_together(sw, en, towers, images):
    sw_path, _, sw_config = sw
    en_path, en_model, en_config = en
    assert en_config.anchor == {"name": str(sw_path), "image_side_id": sw_config.image_side_id}
    assert en_config.image_side_id == sw_config.image_side_id
    assert (en_config.method, en_config.image_method) == ("lora", "ln+adapter")
    assert en_config.trainable["towers"]["image"]["trainable"] == 0

    both = mlilt.load(sw_path, en_path)
    assert both.languages == ["sw", "en"]
    assert mlilt.load(en_path, sw_path).languages == ["en", "sw"]
    alone = {"sw": mlilt.load(sw_path), "en": mlilt.load(en_path)}
    assert [m.side for m in both.modules() if isinstance(m, SideEncoder)] == ["text", "text"]  # image: on first use
    image = both.encode_image(images)
    # one image side, the anchor's
    assert sorted(m.side for m in both.modules() if isinstance(m, SideEncoder)) == ["image", "text", "text"]
    assert torch.equal(image, alone["sw"].encode_image(images))
    assert torch.equal(image, alone["en"].encode_image(images))
    for lang in ("sw", "en"):
        assert torch.equal(both.encode_text(CAPTIONS, lang=lang), alone[lang].encode_text(CAPTIONS, lang=lang))
    assert torch.equal(both.encode_text(CAPTIONS, lang="en"), encode_texts(en_model.text, CAPTIONS))
    assert not torch.equal(both.encode_text(CAPTIONS, lang="en"), both.encode_text(CAPTIONS, lang="sw"))

    # the frozen towers are one copy: same storage in both languages and in the registered tower
    name = "model.embeddings.word_embeddings.weight"
    ptrs = {dict(both.texts[lang].tower.named_parameters())[name].data_ptr() for lang in ("sw", "en")}
    assert ptrs == {dict(towers["text"].named_parameters())[name].data_ptr()}
    # ... while what each pack trained is its own (sw trained LayerNorms, en did not)
    ln = "model.encoder.layer.0.output.LayerNorm.weight"
    sw_ln, en_ln = (dict(both.texts[lang].tower.named_parameters())[ln] for lang in ("sw", "en"))
    assert sw_ln.data_ptr() != en_ln.data_ptr() == dict(towers["text"].named_parameters())[ln].data_ptr()

    with pytest.raises(UsageError, match="no pack for lang='fr'.*sw, en"):
        both.encode_text("a red circle", lang="fr")


def test_anchored_pack_carries_its_image_side(sw, en, monkeypatch, images):
    """Loading the anchored pack alone never reads the anchor: the pack holds the image side."""
    import mlilt.api
    read = []
    real_read = mlilt.api.read_pack
    monkeypatch.setattr(mlilt.api, "read_pack", lambda p: read.append(Path(p)) or real_read(p))
    model = mlilt.load(en[0])
    assert read == [en[0]]
    assert torch.equal(model.encode_image(images), _image_embeddings(sw[1].image, images))


def test_same_language_twice_is_refused(sw):
    with pytest.raises(UsageError) as error:
        mlilt.load(sw[0], sw[0])
    assert str(error.value) == f"two packs for lang='sw': {sw[0]} and {sw[0]}"  # the paths, not a config dump


def test_packs_in_different_image_spaces_are_refused(sw, en_elsewhere):
    assert en_elsewhere[2].anchor is None
    assert en_elsewhere[2].image_side_id != sw[2].image_side_id
    with pytest.raises(PackError, match="different image spaces") as error:
        mlilt.load(sw[0], en_elsewhere[0])
    assert str(sw[0]) in str(error.value) and str(en_elsewhere[0]) in str(error.value)
    assert mlilt.load(en_elsewhere[0]).languages == ["en"]  # fine on its own


def test_load_needs_a_pack():
    with pytest.raises(UsageError):
        mlilt.load()


# --------------------------------------------------------------------------- finding packs by name


def _index(folder: Path, entries: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).write_text(json.dumps({"packs": entries}))


def test_load_by_name_from_an_index(sw, tmp_path, monkeypatch):
    packs = tmp_path / "packs"
    _copy_pack(sw[0], packs / "sw")
    _index(packs, {"sw": {"path": "sw", "language": "sw"}})
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)  # no folder named "sw" here: the name must come from the index
    model = mlilt.load("sw")
    assert model.languages == ["sw"]
    assert torch.equal(model.encode_text(CAPTIONS, lang="sw"), mlilt.load(sw[0]).encode_text(CAPTIONS, lang="sw"))
    assert [(name, path.resolve()) for name, path, _ in mlilt.list_packs()] == [("sw", (packs / "sw").resolve())]
    with pytest.raises(PackError, match="no pack 'xx'"):
        mlilt.load("xx")


# --------------------------------------------------------------------------- what a pack folder holds


def test_pack_folder_holds_json_and_safetensors_only(sw, en):
    for path in (sw[0], en[0]):
        files = {p.name: p for p in path.iterdir()}
        assert {PACK_CONFIG, PACK_TENSORS} <= files.keys()
        for name, file in files.items():
            assert file.is_file(), f"{name}: packs are flat folders"
            assert file.suffix in (".json", ".jsonl", ".safetensors"), f"{name}: not JSON or safetensors"
            data = file.read_bytes()
            assert not data.startswith(b"\x80") and not data.startswith(b"PK"), f"{name} looks like a pickle/zip"
            if file.suffix == ".json":
                json.loads(data)
            elif file.suffix == ".jsonl":
                assert all(json.loads(line) is not None for line in data.decode().splitlines())
            else:
                header_length = int.from_bytes(data[:8], "little")
                json.loads(data[8:8 + header_length])  # a safetensors header is plain JSON
    staging = [p.name for p in sw[0].parent.iterdir() if p.name.startswith(".")]
    assert staging == [], f"staging folders left behind: {staging}"


def test_pack_config_has_the_documented_keys(sw, en, towers, demo):
    path, model, _ = sw
    raw = json.loads((path / PACK_CONFIG).read_text(encoding="utf-8"))
    for key in ("format_version", "mlilt_version", "language", "method", "image_method", "embed_dim", "towers",
                "image_side_id", "anchor", "data", "metrics", "created", "training", "trainable"):
        assert key in raw, key
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["mlilt_version"] == mlilt.__version__
    assert (raw["language"], raw["method"], raw["image_method"]) == ("sw", "ln+adapter", "ln+adapter")
    assert raw["embed_dim"] == EMBED_DIM
    for side in ("text", "image"):
        assert raw["towers"][side]["spec"] == towers[side].spec
        assert raw["towers"][side]["fingerprint"] == towers[side].fingerprint()
        assert HEX64.match(raw["towers"][side]["fingerprint"])
    assert raw["towers"]["text"]["options"] == {"pooling": "mean", "max_length": 32, "prefix": ""}
    image = {k[len("image."):]: v for k, v in model.pack_state().items() if k.startswith("image.")}
    assert raw["image_side_id"] == side_id(towers["image"].fingerprint(), image)
    assert raw["anchor"] is None
    assert HEX64.match(raw["data"]["sha256"])
    assert raw["data"]["sha256"] == read_pairs(demo.files("sw")["train"], lang="sw").summary()["sha256"]
    assert raw["data"]["rows"] == raw["data"]["train_pairs"] + raw["data"]["val_pairs"]
    assert "mean_recall" in raw["metrics"]["val"]
    created = dt.datetime.fromisoformat(raw["created"])
    assert created.tzinfo is not None
    assert abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(hours=1)
    assert raw["trainable"]["towers"]["text"]["trainable"] > 0 and raw["trainable"]["towers"]["image"]["trainable"] > 0

    anchored = json.loads((en[0] / PACK_CONFIG).read_text(encoding="utf-8"))
    assert anchored["anchor"] == {"name": str(path), "image_side_id": raw["image_side_id"]}
    # the safetensors header: the language in its metadata, exactly the pack's tensors
    with open(path / PACK_TENSORS, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt", "language": "sw"}
    assert set(header) - {"__metadata__"} == set(model.pack_state())
