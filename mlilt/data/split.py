"""Pairs grouped by image: what training steps and retrieval evaluation index into."""
from __future__ import annotations

from dataclasses import dataclass

from mlilt.data.images import image_id
from mlilt.data.pairs import PairSet


@dataclass
class Split:
    """Captions, their image index, and the distinct images of one split."""

    captions: list[str]
    caption_image: list[int]
    images: list
    sources: list[str]

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> "Split":
        index: dict[str, int] = {}
        split = cls([], [], [], [])
        for pair in pairs:
            key = image_id(pair.image, pair.source)
            if key not in index:
                index[key] = len(split.images)
                split.images.append(pair.image)
                split.sources.append(pair.source)
            split.captions.append(pair.caption)
            split.caption_image.append(index[key])
        return split
