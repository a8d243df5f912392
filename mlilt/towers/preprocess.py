"""Image preprocessing described by a small dict, so that it can key caches and fingerprints."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import functional as F

INTERPOLATIONS = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR,
                  "nearest": F.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side to ``resize``, centre-crop ``crop``, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        image = F.resize(image, self.resize, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
        image = F.center_crop(image, [self.crop, self.crop])
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def config(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
