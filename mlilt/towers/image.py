"""What every image tower shares: one pooled feature vector per image, its own preprocessing,
and channels-last memory for convolutional networks. The families are ``timm_vision``,
``open_clip_vision`` and ``hf_vision``."""
from __future__ import annotations

import torch
from torch import nn

from mlilt.towers.base import Tower
from mlilt.towers.preprocess import ImagePreprocess


class ImageTower(Tower):
    side = "image"

    def __init__(self, spec: str, width: int, model: nn.Module, preprocess: ImagePreprocess, family: str):
        super().__init__(spec, width, {"family": family, "preprocess": preprocess.config()})
        self.model = model
        self.preprocess = preprocess
        self.family = family
        # Convolutional towers run channels-last: oneDNN's and cuDNN's fast convolution paths
        # want NHWC (effnet-lite0 on CPU: forward 1.4-2x, forward + backward 1.1-1.2x faster;
        # benchmarks/perf/levers.py). Same function, so not part of the fingerprint.
        self.channels_last = is_convolutional(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model(self.layout(pixels)))

    def layout(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels

    def pool(self, output) -> torch.Tensor:
        return output


def is_convolutional(model: nn.Module) -> bool:
    """A CNN (more than a patch-embedding convolution), not a ViT: its convolutions carry the cost."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
