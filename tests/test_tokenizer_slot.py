"""Training tokenizes every caption once and hands the tokenizer back while it runs (XLM-R's
takes ~270 MB); the tower loads it again on next use, and refuses one that changed on disk."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mlilt.demo.data import generate_demo
from mlilt.errors import TowerLoadError
from mlilt.packs import PACK_TENSORS
from mlilt.speed.packed import use_padding_free
from mlilt.towers import registry
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import save_tiny_text_tower, tiny_text_tower

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tower_folder(tmp_path):
    """The tiny BERT saved as a Hugging Face folder: a tower the registry can load again."""
    folder = tmp_path / "tiny-bert-folder"
    save_tiny_text_tower(folder)
    return folder


def _train(data, out, text_tower: str):
    config = TrainConfig(lang="sw", data=str(data), out=str(out), text_tower=text_tower, image_tower="tiny-timm-cnn",
                         embed_dim=16, epochs=2, batch_size=8, method="ln+adapter", checkpoint_every=0, max_length=32)
    return load_file(str(train(config).pack / PACK_TENSORS))


def test_training_hands_the_tokenizer_back_and_trains_the_same_pack(tiny_cnn_towers, tower_folder, tmp_path):
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    data = tmp_path / "data" / "sw" / "train.jsonl"
    kept = _train(data, tmp_path / "kept", "tiny-bert-0")  # a tower given in Python: its tokenizer stays
    assert registry.load_text_tower("tiny-bert-0").tokenizer_slot.held
    tower = registry.load_text_tower(str(tower_folder), max_length=32)  # held here: training loads this one
    use_padding_free(tower)  # as the tiny tower given in Python runs
    handed_back = _train(data, tmp_path / "handed-back", str(tower_folder))
    assert registry.load_text_tower(str(tower_folder), max_length=32) is tower
    slot = tower.tokenizer_slot
    assert not slot.held  # handed back before the first step, and not needed since
    assert kept.keys() == handed_back.keys()
    for name, tensor in kept.items():
        assert torch.equal(tensor, handed_back[name]), name  # same token ids, same training
    ids = tower.tokenize(["a red circle"])["input_ids"]  # loaded again on use
    assert slot.held and ids.tolist() == [[2, 4, 7, 11, 3]]


def test_a_tokenizer_changed_on_disk_is_refused_when_loaded_again(tower_folder):
    tower = registry.load_text_tower(str(tower_folder))
    assert tower.tokenizer_slot.hand_back()
    vocab_file = tower_folder / "tokenizer.json"
    definition = json.loads(vocab_file.read_text())
    definition["model"]["vocab"]["kubwa"], definition["model"]["vocab"]["ndogo"] = (
        definition["model"]["vocab"]["ndogo"], definition["model"]["vocab"]["kubwa"])
    vocab_file.write_text(json.dumps(definition))
    with pytest.raises(TowerLoadError, match="tokenizer changed on disk"):
        tower.tokenize(["kubwa"])


def test_a_tokenizer_given_in_python_is_never_handed_back():
    slot = tiny_text_tower().tokenizer_slot
    assert not slot.hand_back() and slot.get() is not None
