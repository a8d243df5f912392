"""Retrieval on a held-out set of pairs (the demo test split, or a user's own data)."""
from __future__ import annotations

import torch

from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.pairs import PairSet
from mlilt.encode import encode_texts
from mlilt.evaluation.retrieval import retrieval_metrics
from mlilt.model import SideEncoder


def evaluate_pairs(text: SideEncoder, image: SideEncoder, pairs: PairSet, use_cache: bool = True) -> dict:
    """Recall@1/5/10 both ways on ``pairs``; image-tower features come from the cache."""
    from mlilt.train import Split

    split = Split.from_pairs(pairs)
    cache = FeatureCache(image.tower) if use_cache else None
    features = tower_features(image.tower, split.images, cache=cache, sources=split.sources)
    with torch.no_grad():
        image_emb = image.project(features)
    text_emb = encode_texts(text, split.captions)
    return retrieval_metrics(text_emb, image_emb, split.caption_image)
