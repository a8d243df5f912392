"""The image space a pack is trained into and lives in, frozen: an anchor.

An anchor is either another mlilt pack (its image side, rebuilt on its image tower) or an
aligned open_clip model ``MODEL:PRETRAINED``, whose ``model.visual`` output *is* its CLIP image
space: the image side is that tower with an identity projection, so a pack's
``encode_image`` is open_clip's normalised ``encode_image`` and every pack on one anchor shares
one image index with the original CLIP. The pack records the anchor by name and image-side id;
loading it rebuilds the tower and refuses one whose weights differ (``packs.check_tower``).
"""
from __future__ import annotations

from dataclasses import dataclass

from mlilt.errors import PackError, UsageError
from mlilt.modeling.factory import image_side_of
from mlilt.modeling.model import SideEncoder, identity_side
from mlilt.packs import read_pack, resolve_pack, side_id
from mlilt.towers.registry import load_image_tower, resolve

# What an open_clip anchor's image side is made by: no tower parameter trains, the projection
# is the identity (``modeling.model.identity_side``).
OPEN_CLIP_IMAGE_METHOD = "head"


@dataclass
class Anchor:
    name: str  # as the user gave it: a pack folder or name, or MODEL:PRETRAINED
    image_side: SideEncoder  # frozen
    image_method: str

    @property
    def embed_dim(self) -> int:
        return self.image_side.proj.out_features

    @property
    def image_side_id(self) -> str:
        """The id of the image space (``packs.side_id``), the one every pack on it records."""
        return side_id(self.image_side.base_fingerprint, self.image_side.own_state())

    def record(self) -> dict:
        return {"name": self.name, "image_side_id": self.image_side_id}


def load_anchor(spec: str) -> Anchor:
    """The anchor ``spec`` names: a pack (folder or installed name), else an open_clip model."""
    try:
        pack = read_pack(resolve_pack(spec))
    except PackError as error:
        if not is_open_clip_spec(spec):
            raise UsageError(f"--anchor {spec!r}: {error}. An anchor is an mlilt pack (folder or installed "
                             f"name) or an open_clip model MODEL:PRETRAINED, e.g. ViT-B-32:openai") from error
        return Anchor(spec, identity_side(load_image_tower(spec)), OPEN_CLIP_IMAGE_METHOD)
    return Anchor(spec, image_side_of(pack), pack.config.image_method)


def is_open_clip_spec(spec: str) -> bool:
    """Whether ``spec`` names an open_clip model (``MODEL:PRETRAINED``, ``open_clip:...``)."""
    try:
        return resolve(spec, "image").family == "open_clip"
    except UsageError:
        return False
