"""A LoRA pack's text side as a PEFT adapter: ``PeftModel.from_pretrained(base, DIR)``.

The folder holds what PEFT's own ``save_pretrained`` writes (``adapter_config.json``,
``adapter_model.safetensors``), from a ``PeftModel`` built on the pack's text tower (a
Hugging Face model) with the pack's LoRA weights, so the adapted model gives the hidden
states of mlilt's LoRA-applied tower. A PEFT adapter is a change of the encoder only: the
rest of the pack's text side, the pooling, the projection into the shared space and the
temperature, goes beside it in ``mlilt_head.safetensors`` (``proj.weight``, ``logit_scale``)
and ``mlilt_head.json`` (pooling, prefix, max_length, embed_dim), and ``README.md`` says how
to use them. The image side is never exported: a PEFT adapter adapts one model.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from mlilt.errors import UsageError
from mlilt.files import atomic
from mlilt.methods.catalog import CATALOG
from mlilt.methods.spec import MethodPart, parse_method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "mlilt_head.safetensors"
HEAD_CONFIG = "mlilt_head.json"
README = "README.md"
WHOLE_TOWER_FORMATS = "sentence-transformers"  # formats that carry a whole tuned text tower


def export_peft(pack_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the text side of the LoRA pack at ``pack_path`` as a PEFT adapter folder ``out``."""
    from mlilt.packs import read_pack

    out = Path(out)
    _check_destination(out, overwrite)
    pack = read_pack(pack_path)
    lora = _text_lora_part(pack.config.method, str(pack.path))
    image_note = _image_side_note(pack)
    if image_note:
        warnings.warn(f"{pack.path}: {image_note}", stacklevel=2)
    side = _text_side(pack)
    peft_model = _peft_model(pack, side)
    with atomic.staged_dir(out, replace=True) as stage:
        # No embedding layers: LoRA never touches them, and PEFT's check of the base model's vocabulary
        # would look the spec up on the hub.
        peft_model.save_pretrained(str(stage), safe_serialization=True, save_embedding_layers=False)
        _write_head(stage, pack, side)
        (stage / README).write_text(_readme(pack, side, lora, peft_model.peft_config["default"], image_note),
                                    encoding="utf-8")
    return out


def _check_destination(out: Path, overwrite: bool) -> None:
    if (out / ADAPTER_CONFIG).exists() and not overwrite:
        raise UsageError(f"{out} already holds a PEFT adapter; pass --overwrite to replace it")
    if out.exists() and not (out / ADAPTER_CONFIG).exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a PEFT adapter folder; choose another --out")


def _text_lora_part(method: str, where: str) -> MethodPart:
    """The pack's one text-side LoRA part; a UsageError naming what else trains there."""
    text_parts = [part for part in parse_method(method) if part.side in (None, "text")
                  and ("text" in CATALOG[part.name].sides or part.name == "head")]
    loras = [part for part in text_parts if part.name == "lora"]
    others = [str(part) for part in text_parts if part.name not in ("lora", "top", "head")]
    if not loras:
        raise UsageError(f"{where}: method {method!r} has no LoRA on the text side, and a PEFT adapter holds LoRA "
                         f"weights only; export it as {WHOLE_TOWER_FORMATS} (--format {WHOLE_TOWER_FORMATS}), "
                         f"which carries the whole tuned tower")
    if others:
        raise UsageError(f"{where}: method {method!r} also trains {'+'.join(others)} on the text side, which a PEFT "
                         f"LoRA adapter cannot hold; export it as {WHOLE_TOWER_FORMATS} "
                         f"(--format {WHOLE_TOWER_FORMATS}), which carries the whole tuned tower")
    return loras[0]


def _image_side_note(pack) -> str:
    """What a text-only export leaves out of an image side this pack trained itself (not an anchor's)."""
    config = pack.config
    trains_tower = any(name.startswith("tower.") for name in pack.side_tensors("image"))
    if config.anchor is not None or not trains_tower:
        return ""
    return (f"its image side trains {config.image_method!r} in the image tower as well; only the text side is "
            f"exported (a PEFT adapter adapts one model): the image side stays in the mlilt pack")


def _text_side(pack):
    from mlilt.modeling.factory import text_side_of
    from mlilt.towers.hf_text import HFTextTower

    side = text_side_of(pack)
    if not isinstance(side.tower, HFTextTower):
        raise UsageError(f"{pack.path}: the text tower {side.tower.spec!r} is not a Hugging Face model; "
                         f"a PEFT adapter needs one")
    return side


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _peft_model(pack, side):
    """A PeftModel on a fresh copy of the frozen text model, holding the pack's LoRA weights."""
    from peft import LoraConfig, get_peft_model

    from mlilt.methods.lora import ADAPTER
    from mlilt.towers.registry import load_text_tower

    layers = _lora_layers(side.tower.model)
    first = next(iter(layers.values()))
    dropout = first.lora_dropout[ADAPTER]
    config = LoraConfig(r=first.r[ADAPTER], lora_alpha=first.lora_alpha[ADAPTER], target_modules=sorted(layers),
                        lora_dropout=float(getattr(dropout, "p", 0.0)), bias="none")
    info = pack.config.towers["text"]
    base = load_text_tower(info["spec"], **info.get("options", {})).share_frozen_clone().model  # ours to wrap
    with torch.random.fork_rng(devices=[]):  # PEFT draws its own init; the weights are the pack's
        peft_model = get_peft_model(base, config)
    targets = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            for factor in ("lora_A", "lora_B"):
                source = getattr(layer, factor)[ADAPTER].weight
                targets[f"base_model.model.{name}.{factor}.{ADAPTER}.weight"].copy_(source)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = info["spec"]  # what it adapts, by mlilt's name
    return peft_model.eval()


def _write_head(stage: Path, pack, side) -> None:
    from mlilt.packs import serialize_tensors

    tensors = {"proj.weight": side.proj.weight.detach().cpu().contiguous(),
               "logit_scale": pack.tensors["logit_scale"].detach().cpu().contiguous()}
    (stage / HEAD_WEIGHTS).write_bytes(serialize_tensors(tensors, {"format": "pt"}))
    tower = side.tower
    head = {"pooling": tower.pooling, "prefix": tower.prefix, "max_length": tower.max_length,
            "embed_dim": pack.config.embed_dim, "normalize": True, "language": pack.config.language,
            "text_tower": pack.config.towers["text"]["spec"], "method": pack.config.method,
            "image_side_id": pack.config.image_side_id}
    (stage / HEAD_CONFIG).write_text(json.dumps(head, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


def _readme(pack, side, lora: MethodPart, config, image_note: str) -> str:
    spec = pack.config.towers["text"]["spec"]
    pooling = "the first token's state" if side.tower.pooling == "cls" else "the mean over real tokens"
    lines = [
        "---", "library_name: peft", f"base_model: {spec}", "tags: [mlilt, lora]", "---", "",
        f"# {pack.config.language} text LoRA from mlilt pack `{Path(pack.path).name}`", "",
        f"The text side of an mlilt language pack (method `{pack.config.method}`, LoRA `{lora}`: rank {config.r}, "
        f"alpha {config.lora_alpha:g}, dropout {config.lora_dropout:g}) as a PEFT LoRA adapter for the text "
        f"tower `{spec}`.", "",
        "```python", "from peft import PeftModel", "from mlilt.towers.registry import load_text_tower", "",
        f"base_model = load_text_tower({spec!r}).share_frozen_clone().model  # or the same transformers model",
        "model = PeftModel.from_pretrained(base_model, \"DIR\")", "```", "",
        f"`base_model_name_or_path` is mlilt's name of the tower (`{spec}`), which may not be a hub name: "
        "load the base model yourself and pass it, as above.", "",
        "## What is not in the adapter", "",
        "A PEFT adapter changes the encoder only. mlilt's text embedding also needs, beside it:", "",
        f"- pooling: {pooling} of the last hidden state, and the text prefix (`{HEAD_CONFIG}`);",
        f"- the projection into the shared image-text space, `proj.weight` [embed_dim, width], and the "
        f"learned logit scale `logit_scale` (log of 1/temperature), both in `{HEAD_WEIGHTS}`;",
        "- L2 normalisation of the projected vector.", "",
        "embedding = normalize(proj.weight @ pool(last_hidden_state)).",
        "The image side (the image tower and its projection) is not exported: it lives in the mlilt pack.",
    ]
    if image_note:
        lines += ["", f"Note: {image_note}."]
    return "\n".join(lines) + "\n"
