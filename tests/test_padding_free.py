"""The padding-free text forward: the linear layers see only real tokens, and the features and
gradients are the model's own, for every method, both paddings, both poolings, bf16 autocast and
gradient checkpointing. A tower it cannot run, or whose packed forward disagrees, runs padded."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlilt.modeling.factory import build_sides
from mlilt.demo.data import generate_demo
from mlilt.speed.grad_checkpoint import checkpoint_blocks
from mlilt.packs import PACK_TENSORS
from mlilt.speed import packed
from mlilt.speed.packed import Packing, why_not_packable
from mlilt.modeling import encode
from mlilt.data.split import Split
from mlilt.training.sources import TextSource
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from test_training_speed_paths import _saved_bytes
from tiny_towers import tiny_text_tower, tiny_xlmr_text_tower

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a large small red blue green yellow circle square star", "ndogo na kubwa",
            "a blue star left", "top", "green"]
METHODS = ["ln", "ln+adapter", "lora", "bitfit", "unlock:1", "full-text"]


def _trained_copy(tower, method):
    """A training copy of ``tower`` with ``method`` applied, its new weights moved off their
    initial values so that a wrong path cannot pass by leaving them at identity."""
    side = build_sides({"text": tower}, method, 8, seed=0)[0]["text"]
    with torch.no_grad():
        for param in side.tower.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return side.tower


def _features_and_grads(tower, tokens, padding_free: bool):
    tower.padding_free = padding_free
    for param in tower.parameters():
        param.grad = None
    features = tower(tokens["input_ids"], tokens["attention_mask"])
    (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
    grads = {name: param.grad for name, param in tower.named_parameters() if param.requires_grad}
    return features.detach(), grads


def _rows_into_the_query_layer(tower, run) -> list[int]:
    """Token rows the first layer's query projection saw, per call, while ``run`` executes."""
    rows = []
    query = tower.model.encoder.layer[0].attention.self.query
    handle = query.register_forward_hook(lambda module, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
    try:
        run()
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize("group", [8, 2], ids=["one-attention-call", "attention-in-groups"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build, pooling, side", [(tiny_text_tower, "mean", "right"),
                                                  (tiny_xlmr_text_tower, "mean", "right"),
                                                  (tiny_xlmr_text_tower, "cls", "right"),
                                                  (tiny_text_tower, "mean", "left")])
def test_features_and_gradients_are_the_models_own(method, build, pooling, side, group, monkeypatch):
    monkeypatch.setattr(packed, "ATTENTION_GROUP", group)
    base = build()
    base.pooling = pooling
    base.tokenizer.padding_side = side
    tower = _trained_copy(base, method)
    tokens = tower.tokenize(CAPTIONS)
    real = int(tokens["attention_mask"].sum())
    assert real < tokens["attention_mask"].numel()  # the batch has padding to drop
    rows = _rows_into_the_query_layer(tower, lambda: _features_and_grads(tower, tokens, padding_free=True))
    assert rows == [real, tokens["attention_mask"].numel()]  # real tokens only, then the one padded self-check
    padded_features, padded_grads = _features_and_grads(tower, tokens, padding_free=False)
    rows = _rows_into_the_query_layer(tower, lambda: _features_and_grads(tower, tokens, padding_free=True))
    packed_features, packed_grads = _features_and_grads(tower, tokens, padding_free=True)
    assert rows == [real]  # checked once: from now on the linear layers see the real tokens only
    assert tower.runs_padding_free and tower.packing_problem is None
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    if group > len(CAPTIONS):
        assert torch.equal(packed_features, padded_features)
        for name, grad in padded_grads.items():
            assert torch.allclose(packed_grads[name], grad, rtol=1e-5, atol=1e-7), name
        return
    # In groups the captions run sorted by length, and one padded to a shorter length sums its
    # attention in another order: the same to float rounding (seen: at most 4e-7 apart).
    assert torch.allclose(packed_features, padded_features, rtol=1e-6, atol=1e-6)
    scale = max(float(grad.abs().max()) for grad in padded_grads.values())  # the key bias's is 0 but for noise
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6 * scale), name


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_runs_in_groups_of_captions_of_about_the_same_length(side, monkeypatch):
    """Sorted by length, the six captions attend in three calls of two, each padded to its own
    longest, whichever side the tokenizer pads on."""
    monkeypatch.setattr(packed, "ATTENTION_GROUP", 2)
    tower = _trained_copy(tiny_text_tower(), "ln")
    tower.tokenizer.padding_side = side
    tokens = tower.tokenize(CAPTIONS)
    _features_and_grads(tower, tokens, padding_free=True)  # the tower's self-check runs first
    calls, attend = [], packed._attend
    monkeypatch.setattr(packed, "_attend", lambda packing, *rest: calls.append(packing.shape) or attend(packing, *rest))
    _features_and_grads(tower, tokens, padding_free=True)
    lengths = sorted(tokens["attention_mask"].sum(1).tolist())
    assert calls == [(2, lengths[1]), (2, lengths[3]), (2, lengths[5])] * len(tower.model.encoder.layer)


def test_attention_groups_are_consecutive_rows_sorted_by_length(monkeypatch):
    monkeypatch.setattr(packed, "ATTENTION_GROUP", 2)
    cpu = torch.device("cpu")
    groups = Packing.of_lengths([1, 2, 2, 4, 5], cpu).attention_groups()
    assert [(group.shape, group.tokens) for group in groups] == [((2, 2), 3), ((2, 4), 6), ((1, 5), 5)]
    unsorted = Packing.of_lengths([4, 1, 2, 2, 5], cpu)
    assert unsorted.attention_groups() == [unsorted]  # groups would mix long and short captions


def test_a_batch_without_padding_runs_the_same_path():
    tower = _trained_copy(tiny_text_tower(), "ln+adapter")
    tokens = tower.tokenize(["a red circle", "a blue star"])
    assert bool(tokens["attention_mask"].all())
    packed, _ = _features_and_grads(tower, tokens, padding_free=True)
    padded, _ = _features_and_grads(tower, tokens, padding_free=False)
    assert torch.equal(packed, padded)


def test_bf16_autocast_gives_the_models_own_features_and_finite_gradients():
    tower = _trained_copy(tiny_text_tower(), "ln+adapter")
    tokens = tower.tokenize(CAPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        padded, _ = _features_and_grads(tower, tokens, padding_free=False)
        packed, grads = _features_and_grads(tower, tokens, padding_free=True)
    assert torch.equal(packed, padded)
    assert all(bool(grad.isfinite().all()) for grad in grads.values())  # padded query rows never give NaN


def test_gradient_checkpointing_still_applies_to_packed_blocks():
    results = {}
    for wrapped in (False, True):
        tower = build_sides({"text": tiny_text_tower()}, "ln+adapter", 8, seed=0)[0]["text"].tower
        if wrapped:
            assert checkpoint_blocks(tower) == 2
        tokens = tower.tokenize(CAPTIONS)
        saved, features = _saved_bytes(lambda: tower(tokens["input_ids"], tokens["attention_mask"]))
        features.square().sum().backward()
        assert tower.runs_padding_free
        results[wrapped] = saved, {n: p.grad for n, p in tower.named_parameters() if p.requires_grad}
    (plain_saved, plain_grads), (ckpt_saved, ckpt_grads) = results[False], results[True]
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def test_a_tower_whose_layers_do_more_falls_back_with_a_warning():
    tower = tiny_text_tower()
    layer = tower.model.encoder.layer[1]
    original = type(layer)

    class Doubled(original):  # a subclass with its own forward: the packed path cannot know it
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            return (out[0] * 2,) + tuple(out[1:]) if isinstance(out, tuple) else out * 2

    layer.__class__ = Doubled
    tokens = tower.tokenize(CAPTIONS)
    with pytest.warns(UserWarning, match="padding-free forward turned off"):
        first = tower(tokens["input_ids"], tokens["attention_mask"])
    assert not tower.runs_padding_free and "differs from the model's own" in tower.packing_problem
    own = tower.model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(first, (own * mask).sum(1) / mask.sum(1))
    rows = _rows_into_the_query_layer(tower, lambda: tower(tokens["input_ids"], tokens["attention_mask"]))
    assert rows == [tokens["attention_mask"].numel()]  # padded from now on, without checking again


def test_towers_it_cannot_run_say_why_and_run_padded():
    tower = tiny_text_tower()
    tower.model.config.position_embedding_type = "relative_key"
    assert "relative_key" in why_not_packable(tower.model)
    assert why_not_packable(torch.nn.Linear(2, 2)) == "not a BERT-family encoder (embeddings, encoder.layer)"
    assert why_not_packable(tiny_text_tower().model) is None
    other = tiny_text_tower()
    del other.model.encoder.layer[1].attention.self.key  # a layer without the parts the packed path calls
    assert why_not_packable(other.model) == "layers of class BertLayer are not laid out as BERT's"
    assert why_not_packable(tiny_xlmr_text_tower().model) is None


def test_packing_round_trips_both_paddings():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    packing = Packing(mask)
    padded = torch.arange(12.0).view(3, 4, 1) * mask.unsqueeze(-1)
    packed = packing.pack(padded)
    assert packed.flatten().tolist() == [0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert torch.equal(packing.unpack(packed), padded)
    assert torch.equal(Packing.of_lengths([3, 1], torch.device("cpu")).attention_mask,
                       torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert packing.additive_mask(torch.bfloat16).isfinite().all()  # fp32's lowest would be -inf here


def test_training_padding_free_writes_the_same_pack(tiny_vit_towers, tmp_path):
    generate_demo(tmp_path / "data", ["sw"], n=30, image_size=32)
    text = tiny_vit_towers["text"]
    packs = {}
    try:
        for padding_free in (False, True):
            text.padding_free = padding_free
            config = TrainConfig(lang="sw", data=str(tmp_path / "data" / "sw" / "train.jsonl"),
                                 out=str(tmp_path / str(padding_free)), text_tower="tiny-bert-0",
                                 image_tower="tiny-timm-vit", embed_dim=16, epochs=2, batch_size=8,
                                 method="ln+adapter", checkpoint_every=0)
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # the self-check must not turn it off
                packs[padding_free] = load_file(str(train(config).pack / PACK_TENSORS))
    finally:
        text.padding_free = True
    assert packs[False].keys() == packs[True].keys()
    for name, tensor in packs[False].items():
        assert torch.allclose(tensor, packs[True][name], atol=1e-5), name


def test_packed_forward_keeps_less_for_the_backward_pass_than_the_padded_one():
    tower = _trained_copy(tiny_text_tower(), "ln+adapter")
    tokens = tower.tokenize(CAPTIONS)
    kept = {}
    for padding_free in (True, False, True):  # the first packed call runs the self-check
        tower.padding_free = padding_free
        kept[padding_free], _ = _saved_bytes(lambda: tower(tokens["input_ids"], tokens["attention_mask"]))
    real = int(tokens["attention_mask"].sum()) / tokens["attention_mask"].numel()
    assert kept[True] < kept[False] * (real + 1) / 2, (kept, real)  # scattering rows keeps no copy of them


@pytest.mark.parametrize("padding_free", [True, False])
def test_a_training_batch_runs_in_one_call_when_padding_free(padding_free, tmp_path, monkeypatch):
    encoder = build_sides({"text": tiny_text_tower()}, "ln+adapter", 8, seed=0)[0]["text"]
    encoder.tower.padding_free = padding_free
    monkeypatch.setattr(encode, "GROUP_CALL_TOKENS", 4)  # the tiny tower's batch is too small to split otherwise
    split = Split(CAPTIONS, list(range(len(CAPTIONS))), [], [])
    source = TextSource(encoder)
    indices = list(range(len(CAPTIONS)))
    source.embed("train", split, indices)  # the first call runs the self-check
    rows = _rows_into_the_query_layer(encoder.tower, lambda: source.embed("train", split, indices))
    real = sum(source.tokenized("train", split).lengths())
    if padding_free:
        assert rows == [real]
    else:  # length groups, each padded to its own longest
        assert len(rows) > 1 and real < sum(rows) < len(CAPTIONS) * max(source.tokenized("train", split).lengths())
