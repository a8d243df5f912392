"""Hugging Face vision towers (``hf:NAME``, or a folder or ``org/name``): ViT, DeiT. The
[CLS] token of the last hidden state, preprocessed as the model's image processor says."""
from __future__ import annotations

import torch
from torch import nn

from mlilt.towers.base import load_error
from mlilt.towers.hf_text import quiet_transformers
from mlilt.towers.image import ImageTower
from mlilt.towers.preprocess import ImagePreprocess

RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes


class HFVisionTower(ImageTower):
    """A Hugging Face vision encoder (ViT, DeiT): the [CLS] token of the last hidden state."""

    def __init__(self, spec: str, model: nn.Module, preprocess: ImagePreprocess):
        super().__init__(spec, model.config.hidden_size, model, preprocess, "hf")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.layout(pixels)).last_hidden_state[:, 0]


def hf_preprocess(processor) -> ImagePreprocess:
    """The same resize/crop/normalise as a Hugging Face image processor's config."""
    size = processor.size
    edge = size.get("shortest_edge") or size.get("height")
    crop = processor.crop_size.get("height", edge) if getattr(processor, "do_center_crop", False) else edge
    resample = RESAMPLE.get(int(getattr(processor, "resample", 3)), "bicubic")
    return ImagePreprocess(edge, crop, tuple(processor.image_mean), tuple(processor.image_std), resample)


def load_hf_vision(spec: str, name: str) -> HFVisionTower:
    """The Hugging Face vision model ``name`` (hub name or folder) as the tower ``spec``."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
            try:  # the pooler is never used (the tower takes the [CLS] state): don't build it
                model = AutoModel.from_pretrained(name, trust_remote_code=False, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise load_error(spec, "a Hugging Face vision model", error) from error
    if getattr(model, "pooler", None) is not None:
        # Keeps unused weights out of methods and fingerprints; a checkpoint without pooler
        # weights would otherwise give it fresh random ones, another fingerprint on every load.
        model.pooler = None
    return HFVisionTower(spec, model, hf_preprocess(processor))
