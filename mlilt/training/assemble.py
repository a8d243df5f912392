"""The model a run trains: towers loaded, the method applied, speed levers set on each tower."""
from __future__ import annotations

from mlilt.methods import MethodReport
from mlilt.defaults import DEFAULT_EMBED_DIM, DEFAULT_IMAGE_TOWER
from mlilt.errors import UsageError
from mlilt.modeling.factory import build_sides
from mlilt.modeling.model import ContrastiveModel, SideEncoder
from mlilt.speed import parse_speed_paths, speed_up
from mlilt.speed.grad_checkpoint import checkpoint_blocks
from mlilt.speed.lean_backward import recompute_norm_activations
from mlilt.towers.registry import load_image_tower, load_text_tower
from mlilt.training.anchors import Anchor, load_anchor
from mlilt.training.config import TrainConfig


def build_model(config: TrainConfig, anchor_spec: str | None = None, width: int | None = None
                ) -> tuple[ContrastiveModel, MethodReport, Anchor | None]:
    """The model, what its method trains, and the anchor whose image space it lives in (if any).

    ``anchor_spec``: the anchor (default: ``config.anchor``); ``width``: the embedding width a
    teacher's targets need, when no anchor fixes it.
    """
    spec = anchor_spec or config.anchor
    anchor = load_anchor(spec) if spec else None
    if anchor and width is not None and width != anchor.embed_dim:
        raise UsageError(f"the teacher's embeddings have {width} dimensions and the image space of --anchor "
                         f"{anchor.name} {anchor.embed_dim}: a student must live in its teacher's space")
    embed_dim = _embed_dim(config, anchor.embed_dim if anchor else width, anchor.name if anchor else "the teacher")
    text_tower = load_text_tower(config.text_tower, pooling=config.pooling, max_length=config.max_length,
                                 prefix=config.text_prefix)
    towers = {"text": text_tower, "image": anchor.image_side.tower if anchor else load_image_tower(config.image_tower)}
    if anchor:
        _check_image_tower(config, anchor)
    sides, report = build_sides(towers, config.method, embed_dim, frozen_sides=("image",) if anchor else (),
                                seed=config.seed)
    if anchor:
        sides["image"] = anchor.image_side
    for encoder in sides.values():
        set_speed_levers(encoder, config)
    return ContrastiveModel(sides["text"], sides["image"]), report, anchor


def _embed_dim(config: TrainConfig, required: int | None, source: str) -> int:
    """The run's embedding width: the anchor's (or teacher's) when one fixes it; an --embed-dim
    given as well must agree."""
    if required is None:
        return config.embed_dim
    if config.embed_dim not in (DEFAULT_EMBED_DIM, required):
        raise UsageError(f"--embed-dim {config.embed_dim} conflicts with {source}, whose space is {required} "
                         f"wide; leave --embed-dim out")
    return required


def _check_image_tower(config: TrainConfig, anchor: Anchor) -> None:
    spec = anchor.image_side.tower.spec
    if config.image_tower not in (DEFAULT_IMAGE_TOWER, spec):
        raise UsageError(f"--image-tower {config.image_tower} conflicts with --anchor {anchor.name}, whose image "
                         f"tower is {spec}; an anchored pack uses its anchor's image tower: leave --image-tower out")


def set_speed_levers(encoder: SideEncoder, config: TrainConfig) -> None:
    """The speed paths ``config`` asks for (``mlilt.speed``), and the memory options: time
    traded for less memory where asked."""
    speed_up(encoder, parse_speed_paths(config.speed_paths))
    if encoder.tower_trains():
        if config.recompute_norms:
            recompute_norm_activations(encoder.tower)
        if config.grad_checkpointing:
            checkpoint_blocks(encoder.tower)
