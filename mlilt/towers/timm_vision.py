"""timm image towers (``timm:NAME``): a model built with ``num_classes=0``, whose forward
returns pooled features, preprocessed as timm's own data config says."""
from __future__ import annotations

from torch import nn

from mlilt.towers.base import load_error
from mlilt.towers.image import ImageTower
from mlilt.towers.preprocess import ImagePreprocess


class TimmImageTower(ImageTower):
    """A timm model built with ``num_classes=0``: its forward returns pooled features."""

    def __init__(self, spec: str, model: nn.Module, preprocess: ImagePreprocess):
        super().__init__(spec, model.num_features, model, preprocess, "timm")


def timm_preprocess(model: nn.Module, crop_pct: float | None = None) -> ImagePreprocess:
    """The resize, centre crop and normalisation of ``model``'s timm data config; ``crop_pct``
    overrides the config's crop fraction (1.0: no margin, the crop is the resized image)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({} if crop_pct is None else {"crop_pct": crop_pct}, model=model)
    size = config["input_size"][-1]
    return ImagePreprocess(int(round(size / config["crop_pct"])), size, tuple(config["mean"]), tuple(config["std"]),
                           config["interpolation"])


def load_timm(spec: str, name: str) -> TimmImageTower:
    """The pretrained timm model ``name`` as the tower ``spec``."""
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except (RuntimeError, OSError, ValueError) as error:
        raise load_error(spec, "a timm model", error) from error
    return TimmImageTower(spec, model, timm_preprocess(model))
