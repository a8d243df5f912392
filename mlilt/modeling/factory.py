"""Build the encoders a pack needs: tower copies that share the frozen weights, the method
applied, and a projection per side; or rebuild them from a saved pack."""
from __future__ import annotations

import torch

from mlilt.methods import MethodReport, apply_methods
from mlilt.modeling.model import SideEncoder
from mlilt.packs import Pack, check_tower
from mlilt.towers.base import Tower
from mlilt.towers.registry import load_image_tower, load_text_tower


def build_sides(towers: dict[str, Tower], method: str, embed_dim: int, frozen_sides: tuple[str, ...] = (),
                strict: bool = True, seed: int = 0) -> tuple[dict[str, SideEncoder], MethodReport]:
    """Encoders for the given sides with ``method`` applied to their tower copies.

    Method parameters and projections start from ``seed``; the caller's global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clones = {side: tower.share_frozen_clone() for side, tower in towers.items()}
        report = apply_methods(method, clones, frozen_sides=frozen_sides, strict=strict)
        encoders = {side: SideEncoder(clones[side], embed_dim, base=towers[side]) for side in clones}
    for side in frozen_sides:
        if side in encoders:
            encoders[side].freeze()
    return encoders, report


def load_state_strict(encoder: SideEncoder, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into the encoder's own parameters; names, shapes and dtypes must match."""
    from mlilt.errors import PackError
    from mlilt.methods.lora import current_names

    own = encoder.own_state()
    tensors = current_names(tensors, set(own))  # LoRA packs saved before PEFT wrapped their layers
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise PackError(f"{where}: tensors do not match the method's parameters "
                        f"(missing: {_few(missing)}; unexpected: {_few(unexpected)})")
    for name, param in own.items():
        value = tensors[name]
        if value.shape != param.shape or value.dtype != param.dtype:
            raise PackError(f"{where}: tensor {name} is {value.dtype} {tuple(value.shape)}, "
                            f"expected {param.dtype} {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name])


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"


def image_side_of(pack: Pack, tower=None) -> SideEncoder:
    """The image side a pack defines, rebuilt on its image tower and frozen."""
    tower = tower or load_image_tower(pack.config.towers["image"]["spec"])
    check_tower(pack, "image", tower.fingerprint(), tower.spec)
    sides, _ = build_sides({"image": tower}, pack.config.image_method, pack.config.embed_dim, strict=False)
    load_state_strict(sides["image"], pack.side_tensors("image"), f"{pack.path} (image side)")
    sides["image"].freeze()
    return sides["image"]


def text_side_of(pack: Pack, tower=None) -> SideEncoder:
    """The text side a pack defines, rebuilt on its text tower (``tower``, else the registry's) and frozen."""
    info = pack.config.towers["text"]
    tower = tower or load_text_tower(info["spec"], **info.get("options", {}))
    check_tower(pack, "text", tower.fingerprint(), tower.spec)
    sides, _ = build_sides({"text": tower}, pack.config.method, pack.config.embed_dim, strict=False)
    load_state_strict(sides["text"], pack.side_tensors("text"), f"{pack.path} (text side)")
    sides["text"].freeze()
    return sides["text"]
