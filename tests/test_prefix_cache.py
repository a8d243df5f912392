"""Frozen means cached inside the text tower: with only the top blocks training, the hidden
states below them are computed once per sentence, and training (on pairs or on parallel text)
gives what the whole tower gives."""
from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.modeling.encode import TokenizedTexts
from mlilt.packs import PACK_TENSORS
from mlilt.speed import SPEED_PATHS
from mlilt.speed.text_cache import PrefixCache, cut_point, first_trainable_block
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import ForwardCalls, train_tiny_pack

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CACHE = ",".join(name for name in SPEED_PATHS if name != "text-prefix-cache")

CAPTIONS = ["a red circle", "a large small red blue green yellow circle square", "ndogo na kubwa",
            "a blue star left", "top"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix-demo") / "data"
    generate_demo(out, ["sw"], n=40, image_size=32)
    return out / "sw" / "train.jsonl"


def _text_side(towers, method):
    sides, _ = build_sides(dict(towers), method, 16, seed=0)
    return sides["text"].tower


@pytest.mark.parametrize("method, cut", [("unlock:1", 1), ("unlock:1@text", 1), ("head", 2), ("unlock:2", None),
                                         ("ln", None), ("ln@text+unlock:1", None), ("lora", None),
                                         ("adapter", None), ("full-text", None), ("bitfit@text", None),
                                         ("ln+adapter+top:1", 1), ("bitfit+lora+top:1@text", 1), ("ln+top:2", None)])
def test_cut_is_the_lowest_trainable_block_and_nothing_below_trains(tiny_vit_towers, method, cut):
    # ln trains the embeddings' LayerNorm; bitfit their biases: nothing may be cached then.
    assert cut_point(_text_side(tiny_vit_towers, method)) == cut


def test_first_trainable_block_sees_blocks_embeddings_and_tail(tiny_vit_towers):
    assert first_trainable_block(_text_side(tiny_vit_towers, "unlock:1")) == 1
    assert first_trainable_block(_text_side(tiny_vit_towers, "head")) == 2  # nothing in the tower trains
    assert first_trainable_block(_text_side(tiny_vit_towers, "ln")) is None  # the embeddings' LayerNorm


def test_cached_features_equal_the_whole_tower_whatever_the_batch(tiny_vit_towers):
    tower = _text_side(tiny_vit_towers, "unlock:1")
    cache = PrefixCache(tower, cut=1, limit_bytes=2**20)
    device = torch.device("cpu")
    captions = TokenizedTexts(tower, CAPTIONS)
    cache.features("train", [0, 1, 2], captions, device)  # filled in one batch composition ...
    order = [4, 2, 0, 3]  # ... read in another, with other padding
    got = cache.features("train", order, captions, device)
    tokens = tower.tokenize([CAPTIONS[i] for i in order])
    assert torch.allclose(got, tower(tokens["input_ids"], tokens["attention_mask"]), atol=1e-5)
    lengths = [len(tower.tokenize([c], pad=False)["input_ids"][0]) for c in CAPTIONS]
    assert [len(cache.states[("train", i)]) for i in range(5)] == lengths  # stored unpadded
    assert cache.bytes == sum(lengths) * tower.width * 4


def test_gradients_flow_into_the_top_blocks_only(tiny_vit_towers):
    tower = _text_side(tiny_vit_towers, "unlock:1")
    cache = PrefixCache(tower, cut=1, limit_bytes=2**20)
    cache.features("train", [0, 1], TokenizedTexts(tower, CAPTIONS), torch.device("cpu")).sum().backward()
    trained = {name for name, p in tower.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith("model.encoder.layer.1.") for name in trained)


def test_memory_limit_stops_the_cache_growing_not_the_training(tiny_vit_towers):
    tower = _text_side(tiny_vit_towers, "unlock:1")
    cache = PrefixCache(tower, cut=1, limit_bytes=3 * tower.width * 4 * 4)  # room for ~3 short captions
    out = cache.features("train", list(range(5)), TokenizedTexts(tower, CAPTIONS), torch.device("cpu"))
    tokens = tower.tokenize(CAPTIONS)
    assert torch.allclose(out, tower(tokens["input_ids"], tokens["attention_mask"]), atol=1e-5)
    assert cache.full and cache.bytes <= cache.limit_bytes and "limit reached" in cache.describe()


def _train(data, out, console=None, **overrides):
    settings = dict(lang="sw", data=data and str(data), out=str(out), text_tower="tiny-bert-0",
                    image_tower="tiny-timm-vit", embed_dim=16, epochs=3, batch_size=8, method="unlock:1@text")
    settings.update(overrides)
    return train(TrainConfig(**settings), console=console)


def _same_run(plain, cached):
    for ours, theirs in zip(cached.history, plain.history, strict=True):
        assert ours.get("loss") == pytest.approx(theirs.get("loss"), abs=1e-5)
        assert ours["val"] == pytest.approx(theirs["val"], abs=1e-3)
    want, got = load_file(str(plain.pack / PACK_TENSORS)), load_file(str(cached.pack / PACK_TENSORS))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-5), name


@pytest.mark.parametrize("method", ["unlock:1@text", "head", "ln@text+adapter@text+top:1@text"])
def test_training_with_the_cache_gives_the_whole_tower_run(tiny_vit_towers, data, tmp_path, method):
    calls = ForwardCalls(tiny_vit_towers["text"])
    plain = _train(data, tmp_path / "plain", method=method, speed_paths=NO_CACHE)
    whole_tower_calls = calls.count
    log = Console(file=io.StringIO(), width=200)
    cached = _train(data, tmp_path / "cached", method=method, console=log)
    calls.handle.remove()
    assert calls.count - whole_tower_calls <= 1  # only the one self-check runs the whole tower
    assert whole_tower_calls > 10
    _same_run(plain, cached)
    assert "text prefix cache: blocks below" in log.file.getvalue() and "MiB" in log.file.getvalue()


def test_distilling_with_the_cache_gives_the_whole_tower_run(tiny_vit_towers, data, tmp_path):
    """Parallel text only, a pack as teacher: every epoch revisits the same sentences, which run
    the frozen block once each."""
    teacher = train_tiny_pack(tmp_path / "teacher", lang="en", text_tower="tiny-bert-0",
                              image_tower="tiny-timm-vit", method="ln@text+adapter@text")
    sources = ["a red circle", "a blue square left", "a small green star", "a large yellow circle top",
               "a red star right", "a blue circle bottom", "a green square", "a small red square left",
               "a large blue star", "a yellow square top", "a red circle right", "a green star bottom"]
    parallel = tmp_path / "en-sw.tsv"
    parallel.write_text("".join(f"{s}\t{s.replace('a ', 'ndogo ')}\n" for s in sources), encoding="utf-8")
    settings = dict(parallel=(str(parallel),), teacher=str(teacher), method="ln@text+adapter@text+top:1@text",
                    batch_size=4, holdout=2)
    calls = ForwardCalls(tiny_vit_towers["text"])
    plain = _train(None, tmp_path / "plain", speed_paths=NO_CACHE, **settings)
    whole_tower_calls = calls.count
    log = Console(file=io.StringIO(), width=200)
    cached = _train(None, tmp_path / "cached", console=log, **settings)
    calls.handle.remove()
    assert calls.count - whole_tower_calls <= 1 and whole_tower_calls > 10
    _same_run(plain, cached)
    assert "text prefix cache: blocks below 1 of 2 cached" in log.file.getvalue()
