"""The model a run trains: towers loaded, the method applied, speed levers set on each tower."""
from __future__ import annotations

from mlilt.methods import MethodReport
from mlilt.modeling.factory import build_sides, image_side_of
from mlilt.modeling.model import ContrastiveModel, SideEncoder
from mlilt.packs import Pack, read_pack, resolve_pack
from mlilt.speed import parse_speed_paths, speed_up
from mlilt.speed.grad_checkpoint import checkpoint_blocks
from mlilt.speed.lean_backward import recompute_norm_activations
from mlilt.towers.registry import load_image_tower, load_text_tower
from mlilt.training.config import TrainConfig


def build_model(config: TrainConfig) -> tuple[ContrastiveModel, MethodReport, Pack | None]:
    """The model, what its method trains, and the anchor pack whose image side it reuses (if any)."""
    text_tower = load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                                 prefix=config.text_prefix)
    image_tower = load_image_tower(config.image_tower)
    anchor_spec = config.anchor_pack()
    frozen = ("image",) if anchor_spec else ()
    sides, report = build_sides({"text": text_tower, "image": image_tower}, config.method, config.embed_dim,
                                frozen_sides=frozen, seed=config.seed)
    anchor = None
    if anchor_spec:
        anchor = read_pack(resolve_pack(anchor_spec))
        sides["image"] = image_side_of(anchor, image_tower)
    for encoder in sides.values():
        set_speed_levers(encoder, config)
    return ContrastiveModel(sides["text"], sides["image"]), report, anchor


def set_speed_levers(encoder: SideEncoder, config: TrainConfig) -> None:
    """The speed paths ``config`` asks for (``mlilt.speed``), and the memory options: time
    traded for less memory where asked."""
    speed_up(encoder, parse_speed_paths(config.speed_paths))
    if encoder.tower_trains():
        if config.recompute_norms:
            recompute_norm_activations(encoder.tower)
        if config.grad_checkpointing:
            checkpoint_blocks(encoder.tower)
