"""Towers load from the folders users have: a saved Hugging Face text model, a
sentence-transformers folder, a saved Hugging Face vision model. Fingerprints see weights,
config and tokenizer. Specs resolve to one family each; loading leaves transformers' settings
as it found them; loaded towers live while a model uses them."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor
from transformers.utils import logging as hf_logging

from mlilt.errors import MliltError, UsageError
from mlilt.modeling.factory import build_sides
from mlilt.towers import registry
from mlilt.towers.hf_text import HFTextTower
from mlilt.towers.registry import load_image_tower, load_text_tower, registered, resolve
from tiny_towers import save_tiny_text_tower, tiny_hf_vit, tiny_text_tower, tiny_timm_vit


@pytest.fixture
def saved_text_model(tmp_path):
    folder = tmp_path / "tiny-bert"
    return save_tiny_text_tower(folder), folder


def test_text_tower_from_a_local_folder_matches_the_original(saved_text_model):
    original, folder = saved_text_model
    loaded = load_text_tower(str(folder), max_length=32)
    tokens = loaded.tokenize(["a red circle", "blue square and star"])
    with torch.no_grad():
        assert torch.allclose(loaded(**tokens), original(**original.tokenize(["a red circle", "blue square and star"])))
    assert loaded.pooling == "mean" and loaded.prefix == ""
    assert not any(p.requires_grad for p in loaded.parameters())


def test_sentence_transformers_folder_takes_its_pooling_and_length(saved_text_model, tmp_path):
    _, folder = saved_text_model
    st = tmp_path / "st-model"
    (st / "0_Transformer").mkdir(parents=True)
    for file in folder.iterdir():
        (st / "0_Transformer" / file.name).write_bytes(file.read_bytes())
    (st / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_cls_token": True}))
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    tower = load_text_tower(str(st), max_length=64)
    assert tower.pooling == "cls" and tower.max_length == 16


def test_hf_vision_tower_from_a_local_folder_uses_its_processor_config(tmp_path):
    original = tiny_hf_vit()
    folder = tmp_path / "tiny-vit"
    original.model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    tower = load_image_tower(str(folder))
    assert tower.preprocess.crop == 32 and tower.preprocess.mean == (0.5, 0.5, 0.5)
    pixels = tower.preprocess(Image.new("RGB", (50, 40), (200, 10, 10))).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tower(pixels), original(pixels), atol=1e-6)
    assert tower.fingerprint() == load_image_tower("hf:" + str(folder)).fingerprint()  # no fresh random pooler


def test_unreachable_hub_name_is_a_clear_error():
    with pytest.raises(MliltError, match="could not load tower 'no-such-org/no-such-model'"):
        load_text_tower("no-such-org/no-such-model")
    with pytest.raises(MliltError, match="not an open_clip model"):
        load_image_tower("NoSuchModel:openai")


def test_fingerprint_sees_weights_config_and_tokenizer():
    base = tiny_text_tower(seed=0)
    same = tiny_text_tower(seed=0)
    other_weights = tiny_text_tower(seed=1)
    assert base.fingerprint() == same.fingerprint()
    assert base.fingerprint() != other_weights.fingerprint()
    cls_pooled = HFTextTower(base.spec, same.model, same.tokenizer, pooling="cls", max_length=32)
    assert cls_pooled.fingerprint() != base.fingerprint()
    other_vocab = tiny_text_tower(seed=0)
    other_vocab.tokenizer.add_tokens(["mbwa"])
    rebuilt = HFTextTower(base.spec, other_vocab.model, other_vocab.tokenizer, max_length=32)
    assert rebuilt.fingerprint() != base.fingerprint()


def test_towers_stay_in_eval_mode():
    tower = tiny_text_tower()
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())


@pytest.mark.parametrize("spec, side, family, name", [
    ("me5-small", "text", "embedded", "me5-small"),
    ("effnet-lite0", "image", "embedded", "effnet-lite0"),
    ("hf:xlm-roberta-base", "text", "hf", "xlm-roberta-base"),
    ("xlm-roberta-base", "text", "hf", "xlm-roberta-base"),
    ("timm:vit_base_patch16_224", "image", "timm", "vit_base_patch16_224"),
    ("vit_base_patch16_224", "image", "timm", "vit_base_patch16_224"),
    ("open_clip:ViT-B-32:openai", "image", "open_clip", "ViT-B-32:openai"),
    ("ViT-B-32:openai", "image", "open_clip", "ViT-B-32:openai"),
    ("hf:facebook/deit-base-patch16-224", "image", "hf", "facebook/deit-base-patch16-224"),
    ("facebook/deit-base-patch16-224", "image", "hf", "facebook/deit-base-patch16-224"),
])
def test_every_spec_resolves_to_one_family(spec, side, family, name):
    resolved = resolve(spec, side)
    assert (resolved.family, resolved.name) == (family, name)


def test_e5_names_get_the_query_prefix_and_unknown_prefixes_name_the_accepted_ones():
    assert resolve("intfloat/multilingual-e5-base", "text").text_prefix == "query: "
    assert resolve("xlm-roberta-base", "text").text_prefix == ""
    with pytest.raises(UsageError, match=r"unknown prefix 'timm:'; tower specs: me5-small, hf:NAME"):
        load_text_tower("timm:resnet50")


def test_a_folders_own_prompt_sets_the_prefix(saved_text_model, tmp_path):
    _, folder = saved_text_model
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}}))
    assert load_text_tower(str(folder)).prefix == "query: "
    assert load_text_tower(str(folder), prefix="").prefix == ""


def test_loading_restores_transformers_verbosity_and_progress_bars(saved_text_model):
    _, folder = saved_text_model
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        load_text_tower(str(folder), max_length=16)
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_loaded_towers_are_shared_while_a_model_holds_them_and_freed_after(saved_text_model):
    _, folder = saved_text_model
    first = build_sides({"text": load_text_tower(str(folder), max_length=24)}, "ln", 8)[0]["text"]
    second = build_sides({"text": load_text_tower(str(folder), max_length=24)}, "ln", 8)[0]["text"]
    shared = first.tower.shared_from.tower
    assert second.tower.shared_from.tower is shared  # two models alive at once: one tower
    assert next(first.tower.model.parameters()) is next(shared.model.parameters())
    assert load_text_tower(str(folder), max_length=24) is shared
    freed = weakref.ref(shared)
    del first, second, shared
    gc.collect()
    assert freed() is None  # no model holds it: the registry does not keep it


def test_registered_towers_come_back_as_they_were():
    outer, inner, image = tiny_text_tower(seed=0), tiny_text_tower(seed=1), tiny_timm_vit()
    outer.spec = inner.spec = "registered-text"  # specs no other test registers
    image.spec = "registered-image"
    with registered(outer, image):
        assert load_text_tower(outer.spec) is outer and load_image_tower(image.spec) is image
        with registered(inner):
            assert load_text_tower(outer.spec) is inner
        assert load_text_tower(outer.spec) is outer
    assert registry.unregister_tower("text", outer.spec) is None  # nothing was registered before
    assert registry.unregister_tower("image", image.spec) is None
