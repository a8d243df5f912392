"""open_clip image towers (``MODEL:PRETRAINED``): ``model.visual``, already projected into its
CLIP embedding space, preprocessed as its ``preprocess_cfg`` says."""
from __future__ import annotations

from torch import nn

from mlilt.errors import UsageError
from mlilt.towers.base import load_error
from mlilt.towers.image import ImageTower
from mlilt.towers.preprocess import ImagePreprocess


class OpenClipImageTower(ImageTower):
    """open_clip's ``model.visual``: already projected into its CLIP embedding space."""

    def __init__(self, spec: str, visual: nn.Module, preprocess: ImagePreprocess):
        super().__init__(spec, visual.output_dim, visual, preprocess, "open_clip")


def create_open_clip(spec: str, name: str | None = None):
    """The whole open_clip model for ``MODEL:PRETRAINED`` (``name``, else ``spec``; an empty
    PRETRAINED: random init)."""
    import open_clip

    model, _, pretrained = (name or spec).partition(":")
    if model not in open_clip.list_models():
        raise UsageError(f"tower {spec!r}: {model!r} is not an open_clip model "
                         f"(see open_clip.list_models(); e.g. ViT-B-32:openai)")
    try:
        return open_clip.create_model(model, pretrained=pretrained or None)
    except (RuntimeError, OSError, ValueError) as error:
        raise load_error(spec, "open_clip weights", error) from error


def open_clip_preprocess(visual: nn.Module) -> ImagePreprocess:
    """The resize, crop and normalisation of an open_clip visual tower's ``preprocess_cfg``."""
    cfg = visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][-1]
    return ImagePreprocess(size, size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))


def open_clip_visual_tower(spec: str, model) -> OpenClipImageTower:
    """The visual half of a whole open_clip ``model`` as the tower ``spec``."""
    return OpenClipImageTower(spec, model.visual, open_clip_preprocess(model.visual))


def load_open_clip(spec: str, name: str) -> OpenClipImageTower:
    """The visual tower of the open_clip model ``name`` (``MODEL:PRETRAINED``)."""
    return open_clip_visual_tower(spec, create_open_clip(spec, name))
