"""The model users load: one image side, one text side per language, routed by ``lang=``.

Several packs load into one model only if they share an image space (the same anchor); the
frozen towers are one copy however many languages are loaded. The text sides load with the
model; the image side loads when first used, so text-only use never reads the image tower.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch import nn

from mlilt.data.feature_cache import tower_features
from mlilt.errors import PackError, UsageError
from mlilt.modeling.encode import encode_texts
from mlilt.modeling.factory import image_side_of
from mlilt.speed import text_side_of
from mlilt.modeling.model import SideEncoder
from mlilt.packs import Pack, PackConfig, read_pack

DEFAULT_TEMPLATES = ("{}",)
_IMAGE_BUILD = threading.Lock()


@dataclass
class ZeroShotResult:
    probs: torch.Tensor  # [images, classes]
    labels: list[str]  # the predicted class name per image


class MliltModel(nn.Module):
    def __init__(self, image: SideEncoder | Callable[[], SideEncoder], texts: dict[str, SideEncoder],
                 configs: dict[str, PackConfig], logit_scale: float):
        """``image`` is the image side or a function that builds it on first use."""
        super().__init__()
        self._build_image = image if callable(image) and not isinstance(image, nn.Module) else None
        if self._build_image is None:
            self._modules["image"] = image
        self.texts = nn.ModuleDict(texts)
        self.configs = configs
        self.logit_scale = logit_scale
        # Moves with .to()/.cuda(), so an image side built later lands where the model is.
        self.register_buffer("_placement", torch.empty(0), persistent=False)
        self.eval()

    @property
    def image(self) -> SideEncoder:
        """The image side, built (tower loaded, pack tensors checked) the first time it is asked for."""
        if "image" not in self._modules:
            with _IMAGE_BUILD:  # threads serving one model build its image side once
                if "image" not in self._modules:
                    side = self._build_image().to(self._placement.device)
                    side.train(self.training)
                    self._modules["image"] = side
        return self._modules["image"]

    @property
    def languages(self) -> list[str]:
        return list(self.texts)

    def __repr__(self) -> str:
        # What a user needs to know about a loaded model, not the frozen towers' module tree.
        first = next(iter(self.configs.values()))
        towers = first.towers
        lines = [f"MliltModel({len(self.texts)} language{'s' if len(self.texts) != 1 else ''}, "
                 f"embed_dim={first.embed_dim}, device={self._placement.device})",
                 f"  text tower: {towers['text']['spec']}",
                 f"  image tower: {towers['image']['spec']} ({first.image_method}; "
                 f"{'loaded' if 'image' in self._modules else 'loads on first use'})"]
        for lang, config in self.configs.items():
            size = sum(t.numel() for t in self.texts[lang].own_state().values())
            lines.append(f"  {lang}: {config.method}, {size:,} pack parameters in the text side")
        return "\n".join(lines)

    def _text_side(self, lang: str) -> SideEncoder:
        if lang not in self.texts:
            raise UsageError(f"no pack for lang={lang!r} in this model; loaded: {', '.join(self.texts)}")
        return self.texts[lang]

    def encode_text(self, texts: str | list[str], lang: str, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] for captions in ``lang``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return encode_texts(self._text_side(lang), texts, batch_size)

    def encode_image(self, images, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] for PIL images, paths or bytes."""
        images = images if isinstance(images, (list, tuple)) else [images]
        pil = [im for im in images if isinstance(im, Image.Image)]
        if pil and len(pil) == len(images):
            pixels = torch.stack([self.image.tower.preprocess(im) for im in images])
            with torch.no_grad():
                return torch.cat([self.image(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
        if pil:
            raise UsageError("encode_image: pass either PIL images or paths/bytes, not a mix")
        with torch.no_grad():
            return self.image.project(tower_features(self.image.tower, list(images), batch_size))

    def similarity(self, texts, images, lang: str) -> torch.Tensor:
        """Cosine similarity [texts, images]; accepts raw inputs or embeddings."""
        text = texts if isinstance(texts, torch.Tensor) else self.encode_text(texts, lang)
        image = images if isinstance(images, torch.Tensor) else self.encode_image(images)
        return text @ image.t()

    def zero_shot_classify(self, images, classnames: list[str], lang: str,
                           templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> ZeroShotResult:
        """Classify images by their similarity to class prompts in ``lang`` (templates averaged)."""
        if not classnames:
            raise UsageError("zero_shot_classify: no class names given")
        prompts = [template.format(name) for name in classnames for template in templates]
        text = self.encode_text(prompts, lang).view(len(classnames), len(templates), -1).mean(1)
        text = torch.nn.functional.normalize(text, dim=-1)
        probs = (self.logit_scale * self.similarity(text, images, lang).t()).softmax(-1)
        return ZeroShotResult(probs, [classnames[i] for i in probs.argmax(-1).tolist()])


def load(*packs: str | os.PathLike) -> MliltModel:
    """Load one or more language packs (names from an index, or folders) into one model.

    Each text side is built and checked against its pack here; the image side is built and
    checked on first use (``encode_image``, ``similarity`` on raw images, ``model.image``).
    """
    if not packs:
        raise UsageError("mlilt.load: name at least one pack (a folder or an indexed name such as 'sw')")
    read = [read_pack(p) for p in packs]
    _check_same_image_space(read)
    texts, configs, paths = {}, {}, {}
    for pack in read:
        lang = pack.config.language
        if lang in texts:
            raise UsageError(f"two packs for lang={lang!r}: {paths[lang]} and {pack.path}")
        texts[lang] = text_side_of(pack)
        configs[lang], paths[lang] = pack.config, pack.path
    scale = float(read[0].tensors["logit_scale"].exp().clamp(max=100.0)) if "logit_scale" in read[0].tensors else 1.0
    return MliltModel(functools.partial(image_side_of, read[0]), texts, configs, scale)


def _check_same_image_space(packs: list[Pack]) -> None:
    first = packs[0]
    for pack in packs[1:]:
        if pack.config.image_side_id != first.config.image_side_id:
            raise PackError(f"{pack.path} and {first.path} live in different image spaces "
                            f"(image sides {pack.config.image_side_id[:12]} vs {first.config.image_side_id[:12]}); "
                            f"load them separately, or train them against the same --anchor")
