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
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mlilt
import mlilt.training.trainer as train_module
from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.data.pairs import read_pairs
from mlilt.modeling.encode import encode_texts
from mlilt.errors import PackError, UsageError
from mlilt.modeling.model import ContrastiveModel, SideEncoder, image_side_id
from mlilt.packs import FORMAT_VERSION, INDEX_FILE, PACK_CONFIG, PACK_TENSORS, PackConfig, read_pack, save_pack
from mlilt.towers import registry
from mlilt.towers.registry import register_tower
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
    with pytest.MonkeyPatch.context() as mp:
        # record whatever was registered before (other modules register towers too) ...
        mp.setitem(registry._registered_text, TEXT_SPEC, None)
        mp.setitem(registry._loaded, ("image", IMAGE_SPEC), None)
        register_tower(text)  # ... then register through the public function
        register_tower(image)
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
    captured = {}

    def capturing_save(out_path, model, pack_config, overwrite=False):
        captured.update(model=model, config=copy.deepcopy(pack_config))
        return real_save(out_path, model, pack_config, overwrite=overwrite)

    real_save = train_module.save_pack
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLILT_CACHE", str(root / "cache"))
        mp.setenv("MLILT_PACKS", str(root / "no-packs-here"))
        mp.setattr(train_module, "save_pack", capturing_save)
        result = train(config)
    assert result.pack == Path(config.out)
    return result.pack, captured["model"], captured["config"]


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


def _rewrite_tensors(pack: Path, change, fix_image_side_id: bool = False) -> None:
    """Rewrite the pack's tensors with ``change(tensors)`` applied; optionally record the new
    image_side_id so the damage gets past the image-side check."""
    tensors = load_file(str(pack / PACK_TENSORS))
    change(tensors)
    save_file(tensors, str(pack / PACK_TENSORS))
    if fix_image_side_id:
        raw = json.loads((pack / PACK_CONFIG).read_text())
        image = {k[len("image."):]: v for k, v in tensors.items() if k.startswith("image.")}
        raw["image_side_id"] = image_side_id(raw["towers"]["image"]["fingerprint"], image)
        (pack / PACK_CONFIG).write_text(json.dumps(raw))


def _edit_config(pack: Path, change) -> None:
    raw = json.loads((pack / PACK_CONFIG).read_text())
    change(raw)
    (pack / PACK_CONFIG).write_text(json.dumps(raw))


def _pack_config_for(model: ContrastiveModel, method: str, lang: str) -> PackConfig:
    """A PackConfig filled in the way train.py fills it."""
    text, image = model.text.tower, model.image.tower
    image_tensors = {k[len("image."):]: v for k, v in model.pack_state().items() if k.startswith("image.")}
    return PackConfig(
        language=lang, method=method, image_method=method, embed_dim=EMBED_DIM,
        towers={"text": {"spec": text.spec, "fingerprint": model.text.base_fingerprint,
                         "options": {"pooling": text.pooling, "max_length": text.max_length, "prefix": text.prefix}},
                "image": {"spec": image.spec, "fingerprint": model.image.base_fingerprint, "options": {}}},
        image_side_id=image_side_id(model.image.base_fingerprint, image_tensors))


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

    path = save_pack(tmp_path / "pack", model, _pack_config_for(model, method, "sw"))
    loaded = mlilt.load(path)
    assert torch.equal(loaded.encode_text(CAPTIONS, lang="sw"), wanted["text"])
    assert torch.equal(loaded.encode_image(images), wanted["image"])


# --------------------------------------------------------------------------- other towers


def test_pack_on_another_text_tower_is_refused(sw, monkeypatch):
    path, model, config = sw
    other = tiny_text_tower(seed=1)
    other.spec = TEXT_SPEC  # same name, other weights
    monkeypatch.setitem(registry._registered_text, TEXT_SPEC, other.freeze())
    with pytest.raises(PackError) as error:
        mlilt.load(path)
    message = str(error.value)
    recorded = config.towers["text"]["fingerprint"]
    assert recorded != other.fingerprint()
    assert recorded[:12] in message and other.fingerprint()[:12] in message
    assert f"text tower {TEXT_SPEC!r}" in message and str(path) in message


def test_pack_on_another_image_tower_is_refused(sw, monkeypatch):
    path, _, config = sw
    other = tiny_timm_vit()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # one weight nudged: a different tower
    monkeypatch.setitem(registry._loaded, ("image", IMAGE_SPEC), other.freeze())
    with pytest.raises(PackError) as error:
        mlilt.load(path)
    message = str(error.value)
    assert config.towers["image"]["fingerprint"][:12] in message and other.fingerprint()[:12] in message
    assert f"image tower {IMAGE_SPEC!r}" in message


# --------------------------------------------------------------------------- damaged pack files


@pytest.mark.parametrize("keep", [0, 4, 9, 0.5, -1])
def test_truncated_tensor_file(sw, tmp_path, keep):
    pack = _copy_pack(sw[0], tmp_path / "p")
    data = (pack / PACK_TENSORS).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    (pack / PACK_TENSORS).write_bytes(data[:cut])
    with pytest.raises(PackError, match="unreadable or truncated safetensors"):
        mlilt.load(pack)


def test_tensor_file_with_a_broken_header(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")
    data = bytearray((pack / PACK_TENSORS).read_bytes())
    data[8:9] = b"["  # the header's JSON, broken in place: the length still matches
    (pack / PACK_TENSORS).write_bytes(bytes(data))
    with pytest.raises(PackError, match="unreadable or truncated safetensors"):
        mlilt.load(pack)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"'])
def test_config_that_is_not_a_json_object(sw, tmp_path, content):
    pack = _copy_pack(sw[0], tmp_path / "p")
    (pack / PACK_CONFIG).write_bytes(content)
    with pytest.raises(PackError, match=re.escape(PACK_CONFIG)):
        mlilt.load(pack)


@pytest.mark.parametrize("missing", [PACK_CONFIG, PACK_TENSORS])
def test_missing_file_is_named(sw, tmp_path, missing):
    pack = _copy_pack(sw[0], tmp_path / "p")
    (pack / missing).unlink()
    with pytest.raises(PackError, match=f"not a complete pack: {re.escape(missing)} is missing"):
        mlilt.load(pack)


def test_missing_folder(tmp_path):
    with pytest.raises(PackError, match="no pack"):
        mlilt.load(tmp_path / "nowhere")


def test_missing_required_key(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")
    _edit_config(pack, lambda raw: raw.pop("image_side_id"))
    with pytest.raises(PackError, match="missing keys.*image_side_id"):
        mlilt.load(pack)


def test_unknown_config_key_loads_with_a_warning(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")
    _edit_config(pack, lambda raw: raw.update(from_the_future={"x": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = mlilt.load(pack)
    assert torch.equal(loaded.encode_text(CAPTIONS, lang="sw"), mlilt.load(sw[0]).encode_text(CAPTIONS, lang="sw"))


def test_known_keys_load_without_warnings(sw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlilt.load(sw[0])


@pytest.mark.parametrize("key, value, words", [
    ("method", "bogus", "unknown method 'bogus'"),
    ("method", 5, "expected a string"),
    ("image_method", "ln+ln", "listed twice"),
    ("towers", {"image": {"spec": "x", "fingerprint": "y"}}, "towers.text"),
    ("towers", [], "towers.text"),
    ("towers", "DROP-IMAGE-FINGERPRINT", "towers.image"),
])
def test_config_fields_that_loading_relies_on(sw, tmp_path, key, value, words):
    """A malformed pack is a PackError naming the file, never a UsageError or a KeyError."""
    pack = _copy_pack(sw[0], tmp_path / "p")

    def change(raw):
        if value == "DROP-IMAGE-FINGERPRINT":
            del raw["towers"]["image"]["fingerprint"]
        else:
            raw[key] = value

    _edit_config(pack, change)
    with pytest.raises(PackError) as error:
        mlilt.load(pack)
    assert PACK_CONFIG in str(error.value) and key in str(error.value) and words in str(error.value)


def test_method_that_does_not_match_the_tensors(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")
    _edit_config(pack, lambda raw: raw.update(method="lora"))  # the tensors are ln+adapter's
    expected = r"\(text side\): tensors do not match.*missing: .*lora_A.*unexpected: .*adapter"
    with pytest.raises(PackError, match=expected):
        mlilt.load(pack)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "1", None])
def test_newer_or_odd_format_version(sw, tmp_path, version):
    pack = _copy_pack(sw[0], tmp_path / "p")
    _edit_config(pack, lambda raw: raw.update(format_version=version))
    with pytest.raises(PackError, match="format version"):
        mlilt.load(pack)


def test_changed_image_tensor_breaks_image_side_id(sw, tmp_path):
    pack = _copy_pack(sw[0], tmp_path / "p")

    def nudge(tensors):
        name = next(k for k in sorted(tensors) if k.startswith("image.") and "adapter" in k)
        tensors[name] = tensors[name] + 1e-3

    _rewrite_tensors(pack, nudge)
    with pytest.raises(PackError, match="image_side_id"):
        read_pack(pack)
    with pytest.raises(PackError, match="image_side_id"):
        mlilt.load(pack)


def _reshape(name):
    def change(tensors):
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    return change


def _retype(name):
    def change(tensors):
        tensors[name] = tensors[name].double()
    return change


def _add(name):
    def change(tensors):
        tensors[name] = torch.zeros(3)
    return change


def _drop(name):
    def change(tensors):
        del tensors[name]
    return change


TEXT_ADAPTER = "text.tower.model.encoder.layer.1.output.dense.adapter.down.weight"
IMAGE_ADAPTER = "image.tower.model.blocks.0.mlp.fc2.adapter.up.weight"


@pytest.mark.parametrize("change, tensor, words", [
    (_reshape("text.proj.weight"), "proj.weight", "expected torch.float32 (16, 32)"),
    (_retype("text.proj.weight"), "proj.weight", "torch.float64"),
    (_reshape(TEXT_ADAPTER), TEXT_ADAPTER[len("text."):], "(text side)"),
    (_add("text.tower.extra.weight"), "tower.extra.weight", "unexpected"),
    (_drop(TEXT_ADAPTER), TEXT_ADAPTER[len("text."):], "missing"),
    (_reshape("image.proj.weight"), "proj.weight", "(image side)"),
    (_retype(IMAGE_ADAPTER), IMAGE_ADAPTER[len("image."):], "(image side)"),
    (_add("image.tower.extra"), "tower.extra", "unexpected"),
    (_drop(IMAGE_ADAPTER), IMAGE_ADAPTER[len("image."):], "missing"),
], ids=["text-shape", "text-dtype", "text-adapter-shape", "text-extra", "text-missing", "image-shape",
        "image-dtype", "image-extra", "image-missing"])
def test_tensor_mismatch_names_the_tensor(sw, tmp_path, change, tensor, words):
    pack = _copy_pack(sw[0], tmp_path / "p")
    _rewrite_tensors(pack, change, fix_image_side_id=True)
    read_pack(pack)  # the image-side check passes: the damage reaches the strict load
    with pytest.raises(PackError) as error:
        mlilt.load(pack)
    assert tensor in str(error.value) and words in str(error.value)


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


def test_train_refuses_an_existing_pack_before_any_work(sw, demo, tmp_path, monkeypatch):
    pack = _copy_pack(sw[0], tmp_path / "p")
    before = _file_bytes(pack)

    def must_not_run(*args, **kwargs):
        raise AssertionError("train() did work before checking --out")

    for name in ("_load_data", "_build_model", "_fit", "read_pairs", "load_text_tower", "load_image_tower"):
        if hasattr(train_module, name):
            monkeypatch.setattr(train_module, name, must_not_run)
    config = TrainConfig(lang="sw", data=str(demo.files("sw")["train"]), out=str(pack), text_tower=TEXT_SPEC,
                         image_tower=IMAGE_SPEC, embed_dim=EMBED_DIM, epochs=1, batch_size=8)
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
    # one image side, the anchor's
    assert [m.side for m in both.modules() if isinstance(m, SideEncoder)] == ["image", "text", "text"]
    alone = {"sw": mlilt.load(sw_path), "en": mlilt.load(en_path)}
    image = both.encode_image(images)
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


@pytest.mark.parametrize("target", ["../x", "sw/../../x", "ABSOLUTE"])
def test_index_entry_outside_its_folder_is_refused(sw, tmp_path, monkeypatch, target):
    outside = _copy_pack(sw[0], tmp_path / "x")  # a valid pack: only the check can refuse it
    packs = tmp_path / "packs"
    _index(packs, {"sw": {"path": str(outside) if target == "ABSOLUTE" else target, "language": "sw"}})
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackError, match="points outside its folder"):
        mlilt.load("sw")


def test_broken_index_is_a_pack_error(tmp_path, monkeypatch):
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / INDEX_FILE).write_text("{broken")
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackError, match="not a valid pack index"):
        mlilt.load("sw")


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
    assert raw["image_side_id"] == image_side_id(towers["image"].fingerprint(), image)
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
