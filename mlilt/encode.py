"""Batched, gradient-free encoding shared by the API, validation and evaluation."""
from __future__ import annotations

import torch

from mlilt.model import SideEncoder


def length_sorted_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: padding per batch then wastes little compute."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def encode_texts(encoder: SideEncoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised embeddings [N, D] in the input order."""
    out = torch.empty(len(texts), encoder.proj.out_features)
    for batch in length_sorted_batches(texts, batch_size):
        tokens = encoder.tower.tokenize([texts[i] for i in batch])
        out[batch] = encoder(tokens["input_ids"], tokens["attention_mask"]).float()
    return out
