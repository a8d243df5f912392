"""Methods select exactly the right parameters, train only those, and never touch the shared towers.

Every registered method (and a few composites / arguments) is applied to a tiny BERT text
tower and each tiny image tower family. For each combination the test checks

* the set of trainable tower parameters against an independent description of the method,
* a few AdamW steps of the contrastive loss change every trainable tensor and nothing else
  (parameters and buffers of the model, and of the original base towers, stay bit-identical),
* the MethodReport's counts and percentages.

Adapters and LoRA start as the identity (up / B are zero); the test moves them off zero first
so that a path that does not reach the loss cannot pass by accident.
"""
from __future__ import annotations

import random
import re

import pytest
import torch
from torch import nn

from mlilt.modeling.factory import build_sides
from mlilt.errors import UsageError
from mlilt.methods import CATALOG, METHODS, parse_method
from mlilt.modeling.model import ContrastiveModel, contrastive_loss
from tiny_towers import IMAGE_TOWERS, WORDS, tiny_text_tower

EMBED_DIM = 16
BATCH = 6
STEPS = 3
COMPOSITES = ["ln+adapter", "lora:4", "unlock:1", "adapter:8", "ln+adapter+top:1", "bitfit+lora+top:1"]
ALL_METHODS = list(METHODS) + COMPOSITES
TRANSFORMER_BLOCKS = 2  # every tiny transformer tower has two blocks

# Attention projections that LoRA adapts, per tower (BERT and HF ViT: separate q and v;
# timm and open_clip: one fused qkv weight per block).
LORA_TARGETS = {"text": 4, "hf-vit": 4, "timm-vit": 2, "open_clip-vit": 2, "timm-cnn": 0}
# What ``unlock:1`` must select: the last block and everything after it (a trailing "."
# means a module prefix, otherwise an exact parameter name). Both transformers 4 and 5
# names are listed for the HF ViT; only one of them exists.
UNLOCK_1 = {
    "text": ("model.encoder.layer.1.",),  # BERT: nothing after the encoder (no pooler)
    "hf-vit": ("model.layers.1.", "model.encoder.layer.1.", "model.layernorm."),
    "timm-vit": ("model.blocks.1.", "model.norm.", "model.fc_norm.", "model.head."),
    "open_clip-vit": ("model.transformer.resblocks.1.", "model.ln_post.", "model.proj"),
    "timm-cnn": ("model.blocks.4.", "model.conv_head.", "model.bn2."),
}
# The gradient of a key bias is zero in exact arithmetic (softmax ignores a shift that is the
# same for every key), so those tensors need not move; they must still get a gradient.
STRUCTURALLY_ZERO_GRAD = re.compile(r"(attention\.self\.key|attention\.k_proj|attention\.attention\.key)\.bias$")
NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


# --------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()})
    return state


@pytest.fixture(scope="module")
def base_towers():
    """The tiny towers, built once; with a snapshot of each to prove they are never mutated."""
    towers = {"text": tiny_text_tower()}
    towers.update({kind: build() for kind, build in IMAGE_TOWERS.items()})
    return {kind: (tower, _snapshot(tower)) for kind, tower in towers.items()}


def _assert_base_untouched(tower: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = _snapshot(tower)
    assert now.keys() == snapshot.keys(), "a method changed the module structure of the shared base tower"
    for name, value in snapshot.items():
        assert torch.equal(now[name], value), f"the shared base tower's {name} changed"
    assert not any(p.requires_grad for p in tower.parameters()), "a base tower parameter was unfrozen"
    assert not tower.training


# --------------------------------------------------------------------------- expectations


def _parts(method: str) -> list[str]:
    return [part.name for part in parse_method(method) if part.name in METHODS]


def _top_blocks(method: str) -> int | None:
    return next((part.arg for part in parse_method(method) if part.name == "top"), None)


def _in_last_block(kind: str, name: str) -> bool:
    """In the last block or after it: what ``unlock:1`` trains, and where ``top:1`` lets methods act."""
    return any(name.startswith(p) if p.endswith(".") else name == p for p in UNLOCK_1[kind])


def _norm_params(tower: nn.Module) -> set[str]:
    names = set()
    for module_name, module in tower.named_modules():
        if isinstance(module, NORM_TYPES):
            names |= {f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return names


def _expected_trainable(kind: str, side: str, tower: nn.Module, method: str) -> set[str]:
    """Tower parameter names the method must train, described independently of the method code."""
    names = {name for name, _ in tower.named_parameters()}
    expected: set[str] = set()
    for part in _parts(method):
        if side not in METHODS[part].sides:
            continue
        if part == "ln":
            expected |= _norm_params(tower)
        elif part == "bitfit":
            expected |= {n for n in names if n.rpartition(".")[2].endswith("bias")}
        elif part == "adapter":
            expected |= {n for n in names if ".adapter." in n}
        elif part == "lora":
            expected |= {n for n in names if re.search(r"\.lora_[AB](\.default\.weight)?$", n)}  # PEFT's, or open_clip's
        elif part == "unlock":
            expected |= {n for n in names if _in_last_block(kind, n)}
        elif part in ("full", "full-text"):
            expected |= names
    if _top_blocks(method) == 1:
        expected = {n for n in expected if _in_last_block(kind, n)}
    return expected


def _lora_a(module: nn.Module) -> torch.Tensor:
    """LoRA's A: PEFT's layer keeps it as ``lora_A["default"].weight``, open_clip's weight parametrisation as ``lora_A``."""
    return module.lora_A["default"].weight if isinstance(module.lora_A, nn.ModuleDict) else module.lora_A


def _trainable(tower: nn.Module) -> set[str]:
    return {name for name, p in tower.named_parameters() if p.requires_grad}


def _check_structure(kind: str, side: str, tower: nn.Module, method: str, report) -> None:
    """Shape-level facts of each method: what it found, how big the new modules are."""
    parts = parse_method(method)
    names = [name for name, _ in tower.named_parameters()]
    adapters = [name for name, module in tower.named_modules() if name.endswith(".adapter")]
    loras = [name for name, module in tower.named_modules() if hasattr(module, "lora_A")]
    lora_ranks = [_lora_a(tower.get_submodule(n)).shape[0] for n in loras]
    by_name = {part.name: part for part in parts}
    transformer = kind != "timm-cnn"
    blocks = _top_blocks(method) or TRANSFORMER_BLOCKS  # blocks the methods may act in

    if "ln" in by_name:
        norms = {n.rpartition(".")[0] for n in _norm_params(tower)}
        assert norms, f"{kind}: no norm layers found"
        want = nn.modules.batchnorm._BatchNorm if kind == "timm-cnn" else nn.LayerNorm
        assert all(isinstance(tower.get_submodule(n), want) for n in norms)
    if "adapter" in by_name:
        reduction = by_name["adapter"].arg or METHODS["adapter"].default_arg
        if transformer:
            assert len(adapters) == 2 * blocks, adapters
            for name in adapters:
                adapter = tower.get_submodule(name)
                assert adapter.down.out_features == adapter.down.in_features // reduction
            assert all(re.search(r"\.adapter\.(down|up)\.(weight|bias)$", n) for n in names if ".adapter." in n)
        else:
            assert adapters == []
            assert any("adapter" in note and side in note and tower.spec in note for note in report.notes), \
                report.notes
    else:
        assert adapters == []
    if "lora" in by_name:
        rank = by_name["lora"].arg or METHODS["lora"].default_arg
        assert len(loras) == LORA_TARGETS[kind] * blocks // TRANSFORMER_BLOCKS, loras
        assert all(r == rank for r in lora_ranks)
        if not loras:
            assert any("lora" in note and side in note for note in report.notes), report.notes
    else:
        assert loras == []
    rows = [row for row in report.rows if row.side == side]
    for part in parts:
        if side in CATALOG[part.name].sides:
            assert any(row.part == str(part) for row in rows), f"no report row for {part} on {side}"


# --------------------------------------------------------------------------- training


def _random_batch(text_tower, generator: torch.Generator, rng: random.Random):
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 7))) for _ in range(BATCH)]
    tokens = text_tower.tokenize(captions)  # padded to the longest: masks have zeros
    pixels = torch.randn(BATCH, 3, 32, 32, generator=generator)
    return tokens["input_ids"], tokens["attention_mask"], pixels


def _move_identity_inits_off_zero(model: nn.Module) -> None:
    """Adapters' up projections and LoRA's B start at zero: give them values so that every
    method parameter sits on a path with a non-zero gradient."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (re.search(r"\.adapter\.up\.(weight|bias)$", name) or re.search(r"lora_B(\.default\.weight)?$", name)):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _train_steps(model: ContrastiveModel, text_tower) -> None:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)  # no decay:
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)  # only real gradients move a tensor
    model.train()
    for _ in range(STEPS):
        ids, mask, pixels = _random_batch(text_tower, generator, rng)
        loss = contrastive_loss(model.text(ids, mask), model.image(pixels), model.scale())
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# --------------------------------------------------------------------------- the main matrix


@pytest.mark.parametrize("image_kind", list(IMAGE_TOWERS))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_exactly_its_parameters(base_towers, method, image_kind):
    text_base, text_snapshot = base_towers["text"]
    image_base, image_snapshot = base_towers[image_kind]
    bases = {"text": text_base, "image": image_base}
    kinds = {"text": "text", "image": image_kind}

    sides, report = build_sides(bases, method, EMBED_DIM, seed=0)
    model = ContrastiveModel(sides["text"], sides["image"])

    # 1. the right parameters are trainable, and they are copies, never the shared tensors
    for side, encoder in sides.items():
        tower = encoder.tower
        expected = _expected_trainable(kinds[side], side, tower, method)
        assert _trainable(tower) == expected, (
            f"{method} on {side} ({kinds[side]}): unexpected {sorted(_trainable(tower) - expected)[:5]}, "
            f"missing {sorted(expected - _trainable(tower))[:5]}")
        if method == "head" or (method == "full-text" and side == "image"):
            assert not expected
        else:
            assert expected or kinds[side] == "timm-cnn", f"{method} selects nothing in {kinds[side]}"
        if method == "full" or (method == "full-text" and side == "text"):
            assert expected == {n for n, _ in tower.named_parameters()}
        base_ptrs = {p.data_ptr() for p in bases[side].parameters()}
        for name, param in tower.named_parameters():
            if param.requires_grad:
                assert param.data_ptr() not in base_ptrs, f"{side} {name} trains in the shared base storage"
        _check_structure(kinds[side], side, tower, method, report)
        # projections always train (no side is frozen here)
        assert encoder.proj.weight.requires_grad

    # 2. the report agrees with the model
    for side, encoder in sides.items():
        params = list(encoder.tower.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        assert report.trainable[side] == trainable
        assert report.total[side] == total
        assert report.percent(side) == pytest.approx(100.0 * trainable / total)
        assert 0.0 <= report.percent(side) <= 100.0
        assert report.trains_side(side) == (trainable > 0)
        as_dict = report.to_dict()["towers"][side]
        assert as_dict == {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / total, 4)}
    tower_trainable = [p for e in sides.values() for p in e.tower.parameters() if p.requires_grad]
    others = [model.logit_scale, sides["text"].proj.weight, sides["image"].proj.weight]
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in tower_trainable + others}

    # 3. a few optimiser steps move every trainable tensor and nothing else
    _move_identity_inits_off_zero(model)
    before = _snapshot(model)
    _train_steps(model, text_base)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    trainable_names = {f"param:{n}" for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    for key, value in before.items():
        if key in trainable_names:
            name = key.removeprefix("param:")
            assert params[name].grad is not None, f"{name} trains but gets no gradient"
            if not STRUCTURALLY_ZERO_GRAD.search(name):
                assert not torch.equal(after[key], value), f"{name} trains but did not change"
        else:
            assert torch.equal(after[key], value), f"{key} is frozen but changed"
    for encoder in sides.values():
        assert not any(m.training for m in encoder.tower.modules()), "towers must stay in eval mode"

    # 4. the shared base towers are untouched
    _assert_base_untouched(text_base, text_snapshot)
    _assert_base_untouched(image_base, image_snapshot)


def test_batchnorm_statistics_stay_frozen(base_towers):
    """The CNN's running statistics are buffers: they must not follow the training batches."""
    cnn, _ = base_towers["timm-cnn"]
    sides, _ = build_sides({"text": base_towers["text"][0], "image": cnn}, "ln", EMBED_DIM, seed=0)
    model = ContrastiveModel(sides["text"], sides["image"])
    stats = {n: b.clone() for n, b in sides["image"].tower.named_buffers() if "running_" in n}
    assert len(stats) >= 2
    norms = [m for m in sides["image"].tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.weight.requires_grad and m.bias.requires_grad for m in norms)
    _train_steps(model, base_towers["text"][0])
    for name, buffer in sides["image"].tower.named_buffers():
        if name in stats:
            assert torch.equal(buffer, stats[name]), f"{name} changed during training"
    # and the statistics are still the base tower's own tensors (shared, never copied)
    base_ptrs = {b.data_ptr() for b in cnn.buffers()}
    assert all(b.data_ptr() in base_ptrs for n, b in sides["image"].tower.named_buffers() if n in stats)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method, kind", [("adapter@image", "adapter sites"), ("lora@image", "attention weights"),
                                          ("ln+adapter:8@image", "adapter sites")])
def test_explicit_side_without_targets_raises(base_towers, method, kind):
    towers = {"text": base_towers["text"][0], "image": base_towers["timm-cnn"][0]}
    with pytest.raises(UsageError) as error:
        build_sides(towers, method, EMBED_DIM)
    message = str(error.value)
    assert f"found no {kind} in the image tower" in message
    assert "tiny-timm-cnn" in message
    _assert_base_untouched(*base_towers["timm-cnn"])


def test_implicit_side_without_targets_is_a_note(base_towers):
    towers = {"text": base_towers["text"][0], "image": base_towers["timm-cnn"][0]}
    sides, report = build_sides(towers, "adapter", EMBED_DIM)
    assert report.trainable["image"] == 0 and report.trainable["text"] > 0
    assert report.notes == ["adapter: no adapter sites in the image tower (tiny-timm-cnn)"]


@pytest.mark.parametrize("method", ["adapter", "lora", "lora:4"])
def test_method_that_finds_nothing_anywhere_raises(base_towers, method):
    with pytest.raises(UsageError, match="found no .* in any tower .*tiny-timm-cnn"):
        build_sides({"image": base_towers["timm-cnn"][0]}, method, EMBED_DIM)


@pytest.mark.parametrize("method", ["unlock:3", "ln+top:3"])
def test_more_blocks_than_the_tower_has(base_towers, method):
    with pytest.raises(UsageError, match="only 2 blocks"):
        build_sides({"text": base_towers["text"][0]}, method, EMBED_DIM)


@pytest.mark.parametrize("method, words", [
    ("top:1", "cannot be combined with nothing"),
    ("unlock:1+top:1", "cannot be combined with unlock"),
    ("full-text+top:1", "cannot be combined with full-text"),
    ("ln+top:1+top:1@text", "the text tower is given two top limits"),
])
def test_top_limits_only_methods_that_act_per_block(base_towers, method, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        build_sides({"text": base_towers["text"][0], "image": base_towers["timm-vit"][0]}, method, EMBED_DIM)


def test_top_on_a_frozen_side(base_towers):
    towers = {"text": base_towers["text"][0], "image": base_towers["timm-vit"][0]}
    with pytest.raises(UsageError, match="image side is frozen"):
        build_sides(towers, "ln+top:1@image", EMBED_DIM, frozen_sides=("image",))
    sides, report = build_sides(towers, "ln+adapter+top:1", EMBED_DIM, frozen_sides=("image",))  # anchored
    assert report.trainable["image"] == 0
    assert {row.side for row in report.rows} == {"text"}


@pytest.mark.parametrize("method", ["ln@image", "adapter@image", "ln+lora@image", "full@image"])
def test_frozen_side_cannot_be_named(base_towers, method):
    towers = {"text": base_towers["text"][0], "image": base_towers["hf-vit"][0]}
    with pytest.raises(UsageError, match="image side is frozen"):
        build_sides(towers, method, EMBED_DIM, frozen_sides=("image",))


def test_frozen_side_stays_frozen(base_towers):
    towers = {"text": base_towers["text"][0], "image": base_towers["hf-vit"][0]}
    sides, report = build_sides(towers, "ln+adapter", EMBED_DIM, frozen_sides=("image",))
    assert report.trainable == {"text": report.trainable["text"], "image": 0} and report.trainable["text"] > 0
    assert not any(p.requires_grad for p in sides["image"].parameters())  # projection included
    assert not any(".adapter." in n for n, _ in sides["image"].tower.named_parameters())
    assert all(row.side == "text" for row in report.rows)


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown method 'bogus'"),
    ("ln+ln", "listed twice"),
    ("lora:x", "cannot read 'lora:x'"),
    ("ln@audio", "side must be text or image, not 'audio'"),
    ("", "cannot read ''"),
    ("ln+", "cannot read ''"),
    ("adapter:-1", "cannot read 'adapter:-1'"),
])
def test_spec_errors(spec, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_method(spec)


def test_spec_parsing():
    parts = parse_method("ln + lora:4@text+unlock:2@image")
    assert [(p.name, p.arg, p.side) for p in parts] == [("ln", None, None), ("lora", 4, "text"), ("unlock", 2, "image")]
    assert "+".join(map(str, parts)) == "ln+lora:4@text+unlock:2@image"


# --------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("method", ["ln+adapter", "lora:4", "bitfit"])
def test_copies_share_frozen_storage_only(base_towers, method):
    towers = {"text": base_towers["text"][0], "image": base_towers["open_clip-vit"][0]}
    first, _ = build_sides(towers, method, EMBED_DIM, seed=0)
    second, _ = build_sides(towers, method, EMBED_DIM, seed=0)
    for side, base in towers.items():
        base_ptrs = {p.data_ptr() for p in base.parameters()}
        one = {id(p): p for p in first[side].parameters()}
        two = {id(p): p for p in second[side].parameters()}
        frozen_one = {p.data_ptr() for p in one.values() if not p.requires_grad}
        frozen_two = {p.data_ptr() for p in two.values() if not p.requires_grad}
        trainable_one = {p.data_ptr() for p in one.values() if p.requires_grad}
        trainable_two = {p.data_ptr() for p in two.values() if p.requires_grad}
        # every frozen tower weight lives once, in the base tower
        frozen_tower_one = {p.data_ptr() for p in first[side].tower.parameters() if not p.requires_grad}
        frozen_tower_two = {p.data_ptr() for p in second[side].tower.parameters() if not p.requires_grad}
        assert frozen_tower_one and frozen_tower_one == frozen_tower_two <= base_ptrs
        assert frozen_one == frozen_two
        # buffers too (position ids, ...)
        assert {b.data_ptr() for b in first[side].buffers()} == {b.data_ptr() for b in second[side].buffers()}
        # nothing trainable is shared with the other copy or with the base
        assert trainable_one and trainable_two
        assert not trainable_one & trainable_two
        assert not (trainable_one | trainable_two) & base_ptrs
        # the tokenizer / preprocessing objects are shared, not copied
        if side == "text":
            assert first[side].tower.tokenizer is base.tokenizer is second[side].tower.tokenizer
        else:
            assert first[side].tower.preprocess is base.preprocess
    # a concrete frozen weight, by name, is the same storage in both copies and the base
    name = "model.embeddings.word_embeddings.weight"
    weights = [dict(s["text"].tower.named_parameters())[name] for s in (first, second)]
    assert weights[0].data_ptr() == weights[1].data_ptr() == dict(towers["text"].named_parameters())[name].data_ptr()


def test_a_side_on_one_part_only_is_pointed_out():
    """'ln+adapter@text' trains the image tower's norms too: the report says so and how to write
    the text-only spec; specs that say what they mean get no note."""
    from mlilt.methods import apply_methods
    from tiny_towers import tiny_text_tower, tiny_timm_vit

    def notes(spec, frozen=()):
        towers = {"text": tiny_text_tower().share_frozen_clone(), "image": tiny_timm_vit().share_frozen_clone()}
        return apply_methods(spec, towers, frozen_sides=frozen).notes

    assert notes("ln+adapter@text") == ["'@text' restricts only the part it is attached to: ln also acts on the "
                                        "image tower; for the text tower only, write ln@text+adapter@text"]
    assert notes("ln@text+adapter@text") == []
    assert notes("ln+adapter") == []
    assert notes("ln+adapter@text", frozen=("image",)) == []  # anchored: the image side is frozen anyway
    assert notes("ln+adapter+top:1@text") == ["'@text' restricts only the part it is attached to: ln, adapter also "
                                              "act on the image tower; for the text tower only, write "
                                              "ln@text+adapter@text+top:1@text"]
    assert notes("ln@text+top:1") == []  # top alone does nothing to the image tower
