"""LoRA through PEFT: spec options, the hand-written LoRA's numbers kept, old packs loading,
and a pack exported as a PEFT adapter that ``PeftModel.from_pretrained`` loads with the same
hidden states.

LoRA's B starts at zero; every test that compares outputs moves it off zero first, so that
a path that ignored the adapter could not pass.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from mlilt.errors import UsageError
from mlilt.methods import parse_method
from mlilt.methods.lora import LoRADelta, current_names
from mlilt.modeling.factory import build_sides, text_side_of
from mlilt.modeling.model import ContrastiveModel
from mlilt.packs import PACK_CONFIG, PACK_TENSORS, PackConfig, read_pack, save_pack
from mlilt.towers.hf_text import pool
from mlilt.towers.registry import registered
from tiny_towers import IMAGE_TOWERS, save_tiny_text_tower, tiny_text_tower, tiny_timm_vit

import peft  # noqa: E402  (a declared dependency: missing is a failure)

EMBED_DIM = 16
CAPTIONS = ["a large red circle", "kubwa nyekundu duara na mraba", "small blue star left", "a"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def towers():
    text, image = tiny_text_tower(), tiny_timm_vit()
    with registered(text, image):
        yield {"text": text, "image": image}


def _off_zero(module: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad and re.search(r"lora_B(\.default\.weight)?$", name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _tokens(tower):
    return tower.tokenize(CAPTIONS)


def _save(root, towers, method: str, seed: int = 0):
    sides, _ = build_sides(towers, method, EMBED_DIM, seed=seed)
    model = ContrastiveModel(sides["text"], sides["image"])
    _off_zero(model, seed + 1)
    path = save_pack(root, model, PackConfig.for_model(model, "sw", method))
    return path, model


# --------------------------------------------------------------------------- spec


def test_spec_options_round_trip():
    parts = parse_method("ln+lora:8:alpha=16:dropout=0.1:targets=query-key-value@text+top:2")
    lora = parts[1]
    assert (lora.name, lora.arg, lora.side) == ("lora", 8, "text")
    assert dict(lora.options) == {"alpha": "16", "dropout": "0.1", "targets": "query-key-value"}
    assert "+".join(map(str, parts)) == "ln+lora:8:alpha=16:dropout=0.1:targets=query-key-value@text+top:2"
    assert parse_method("lora:alpha=4")[0].arg is None
    assert str(parse_method("lora:8")[0]) == "lora:8"  # the short form is unchanged


@pytest.mark.parametrize("spec, words", [
    ("lora:8:rank=4", "lora has no option 'rank'; its options are alpha, dropout, targets"),
    ("adapter:4:alpha=2", "adapter has no option 'alpha'; it takes no options"),
    ("lora:alpha=0", "alpha must be a positive number"),
    ("lora:dropout=1", "dropout must be a number in [0, 1)"),
    ("lora:targets=query-attn", "(not 'attn')"),
    ("lora:targets=query-query", "each once"),
    ("lora:alpha=2:alpha=3", "given twice"),
    ("lora:8,alpha=16", "options are joined with ':'"),
])
def test_spec_option_errors(spec, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_method(spec)


# --------------------------------------------------------------------------- numbers


def _hand_written(tower, rank: int, seed: int):
    """What ``lora:R`` built before PEFT: a LoRADelta parametrising query and value weights."""
    clone = tower.share_frozen_clone()
    torch.manual_seed(seed)
    for block in clone.model.encoder.layer:
        for linear in (block.attention.self.query, block.attention.self.value):
            delta = LoRADelta(linear.out_features, linear.in_features, rank)
            parametrize.register_parametrization(linear, "weight", delta, unsafe=True)
    return clone


def test_defaults_keep_the_hand_written_lora(towers):
    """Same seed, same A; same B, same outputs (to float rounding); alpha = 2·rank."""
    text = towers["text"]
    old = _hand_written(text, 4, seed=3)
    sides, _ = build_sides({"text": text}, "lora:4", EMBED_DIM, seed=3)
    new = sides["text"].tower
    for block_old, block_new in zip(old.model.encoder.layer, new.model.encoder.layer):
        for name in ("query", "value"):
            delta = getattr(block_old.attention.self, name).parametrizations.weight[0]
            layer = getattr(block_new.attention.self, name)
            assert isinstance(layer, peft.tuners.lora.Linear)
            assert layer.scaling["default"] == 2.0
            assert torch.equal(layer.lora_A["default"].weight, delta.lora_A)
            with torch.no_grad():
                delta.lora_B.normal_(0, 0.3)
                layer.lora_B["default"].weight.copy_(delta.lora_B)
    tokens = _tokens(text)
    with torch.no_grad():
        assert torch.allclose(old(**tokens), new(**tokens), atol=1e-5)


def test_options_take_effect(towers):
    text = towers["text"]
    sides, report = build_sides({"text": text}, "lora:4:alpha=2:targets=qkv-output-up-down", EMBED_DIM)
    layers = {n: m for n, m in sides["text"].tower.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ends = {name.split("layer.0.", 1)[1] for name in layers if ".layer.0." in name}
    assert ends == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense"}
    assert report.rows[0].found == 12
    assert all(layer.scaling["default"] == 0.5 and layer.r["default"] == 4 for layer in layers.values())


def test_dropout_acts_in_training_steps_only(towers):
    text = towers["text"]
    sides, _ = build_sides({"text": text}, "lora:4:dropout=0.5", EMBED_DIM)
    tower = sides["text"].tower
    _off_zero(tower)
    tokens = _tokens(text)
    assert not tower.training  # towers always run in eval mode: dropout follows the gradient mode
    with torch.no_grad():
        first, second = tower(**tokens), tower(**tokens)
    assert torch.equal(first, second)
    torch.manual_seed(0)
    noisy = tower(**tokens)
    assert not torch.allclose(noisy.detach(), first, atol=1e-4)


def test_fused_attention_targets(towers):
    clip = IMAGE_TOWERS["open_clip-vit"]()
    with pytest.raises(UsageError, match="dropout needs the input"):
        build_sides({"image": clip}, "lora:dropout=0.1", EMBED_DIM)
    with pytest.raises(UsageError, match="use qkv"):
        build_sides({"image": towers["image"]}, "lora:targets=query-value", EMBED_DIM)
    sides, report = build_sides({"image": clip}, "lora:2:targets=qkv-output-up", EMBED_DIM)
    names = set(sides["image"].own_state())
    assert any(n.endswith("attn.parametrizations.in_proj_weight.0.lora_A") for n in names)  # hand-written
    assert any(n.endswith("attn.out_proj.parametrizations.weight.0.lora_A") for n in names)
    assert any(n.endswith("mlp.c_fc.lora_A.default.weight") for n in names)  # PEFT's
    assert report.rows[0].found == 6


# --------------------------------------------------------------------------- old packs


def _legacy_name(name: str) -> str:
    """The name the hand-written LoRA gave a tensor (``current_names`` in reverse)."""
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".parametrizations.weight.0.lora_\1", name)
    return re.sub(r"\.base_layer\.(\w+)$", lambda m: (".parametrizations.weight.original" if m[1] == "weight"
                                                       else f".{m[1]}"), name)


def _rewrite_as_legacy(path) -> None:
    """Rename a pack's tensors as mlilt wrote them before PEFT; drop the checksum (older packs had none)."""
    tensors = load_file(path / PACK_TENSORS)
    save_file({_legacy_name(k): v for k, v in tensors.items()}, path / PACK_TENSORS, metadata={"format": "pt"})
    raw = json.loads((path / PACK_CONFIG).read_text())
    raw.pop("tensors_sha256"), raw.pop("tensor_layout")
    (path / PACK_CONFIG).write_text(json.dumps(raw))


@pytest.mark.parametrize("method", ["lora:4@text", "bitfit+lora@text", "unlock:1@text+lora:4@text"])
def test_pack_saved_before_peft_loads(tmp_path, towers, method):
    path, model = _save(tmp_path / "pack", towers, method)
    _rewrite_as_legacy(path)
    names = set(load_file(path / PACK_TENSORS))
    assert any(".parametrizations.weight.0.lora_A" in n for n in names) and not any(".default." in n for n in names)
    with pytest.warns(UserWarning, match="no tensors_sha256"):
        pack = read_pack(path)
    side = text_side_of(pack)
    tokens = _tokens(towers["text"])
    with torch.no_grad():
        assert torch.allclose(side(tokens["input_ids"], tokens["attention_mask"]),
                              model.text(tokens["input_ids"], tokens["attention_mask"]), atol=1e-6)


def test_current_names_leaves_other_names_alone():
    tensors = {"tower.a.parametrizations.weight.0.lora_A": torch.zeros(1), "proj.weight": torch.zeros(1),
               "tower.b.parametrizations.in_proj_weight.0.lora_A": torch.zeros(1)}
    wanted = {"tower.a.lora_A.default.weight", "proj.weight", "tower.b.parametrizations.in_proj_weight.0.lora_A"}
    assert set(current_names(tensors, wanted)) == wanted


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["lora:4@text", "lora:4:alpha=3:targets=query-key-value-output@text+top:1@text"])
def test_exported_adapter_gives_the_same_hidden_states(tmp_path, towers, method):
    from peft import PeftModel
    from transformers import BertModel

    from mlilt.export.peft import export_peft

    path, model = _save(tmp_path / "pack", towers, method)
    out = export_peft(path, tmp_path / "peft")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "mlilt_head.safetensors", "mlilt_head.json", "README.md"}
    save_tiny_text_tower(tmp_path / "base")
    base = BertModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    adapted = PeftModel.from_pretrained(base, out).eval()
    text = model.text.tower
    tokens = _tokens(text)
    with torch.no_grad():
        ours = text.model(**tokens).last_hidden_state
        theirs = adapted(**tokens).last_hidden_state
        plain = BertModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)(**tokens).last_hidden_state
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does change the model
    assert torch.allclose(theirs, ours, atol=1e-5)
    head = load_file(out / "mlilt_head.safetensors")
    settings = json.loads((out / "mlilt_head.json").read_text())
    with torch.no_grad():
        embedding = nn.functional.normalize(pool(theirs, tokens["attention_mask"], settings["pooling"])
                                            @ head["proj.weight"].t(), dim=-1)
        assert torch.allclose(embedding, model.text(tokens["input_ids"], tokens["attention_mask"]), atol=1e-5)
    assert math.isclose(float(head["logit_scale"]), float(model.logit_scale.detach()))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == text.spec


def test_export_refuses_what_a_lora_adapter_cannot_hold(tmp_path, towers):
    from mlilt.export.peft import export_peft

    path, _ = _save(tmp_path / "ln", towers, "ln+adapter@text")
    with pytest.raises(UsageError, match="no LoRA on the text side.*sentence-transformers"):
        export_peft(path, tmp_path / "out")
    path, _ = _save(tmp_path / "mixed", towers, "ln+lora@text")
    with pytest.raises(UsageError, match="also trains ln on the text side.*sentence-transformers"):
        export_peft(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_pack_whose_image_side_trains_too(tmp_path, towers):
    from mlilt.export.peft import export_peft

    path, _ = _save(tmp_path / "both", towers, "lora:4")  # LoRA in the timm ViT as well
    with pytest.warns(UserWarning, match="only the text side is exported"):
        out = export_peft(path, tmp_path / "out")
    assert "only the text side is exported" in (out / "README.md").read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    assert all(target.startswith("encoder.layer.") for target in config["target_modules"])
    with pytest.raises(UsageError, match="already holds a PEFT adapter"):
        export_peft(path, out)
    with pytest.warns(UserWarning):
        export_peft(path, out, overwrite=True)
