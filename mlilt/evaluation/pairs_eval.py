"""Retrieval on a held-out set of pairs (the demo test split, or a user's own data)."""
from __future__ import annotations

from mlilt.data.pairs import PairSet
from mlilt.modeling.model import SideEncoder


def evaluate_pairs(text: SideEncoder, image: SideEncoder, pairs: PairSet, lang: str = "") -> dict:
    """Recall@1/5/10 both ways on ``pairs``; image-tower features come from the cache."""
    from mlilt.evaluation.evaluate import pairs_retrieval_set
    from mlilt.evaluation.runner import ImageSpace, evaluate_sets

    item = pairs_retrieval_set("pairs", pairs, lang)
    return evaluate_sets(text, ImageSpace(image), [item], "model", "memory")[0].metrics
