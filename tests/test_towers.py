"""Towers load from the folders users have: a saved Hugging Face text model, a
sentence-transformers folder, a saved Hugging Face vision model. Fingerprints see weights,
config and tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from mlilt.errors import MliltError
from mlilt.towers.registry import load_image_tower, load_text_tower
from mlilt.towers.text import HFTextTower
from tiny_towers import save_tiny_text_tower, tiny_hf_vit, tiny_text_tower


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
