"""Batched, gradient-free encoding shared by the API, validation and evaluation.

Captions are tokenized once, sorted by token count and padded per batch to the longest caption
of that batch, never to a fixed length: the text tower's cost follows the real tokens.
"""
from __future__ import annotations

import inspect

import torch

from mlilt.model import SideEncoder


def length_sorted_batches(texts: list[str], batch_size: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Index batches of similar length (``lengths``, else characters): padding per batch then
    wastes little compute. Equal lengths keep their input order."""
    keys = lengths if lengths is not None else [len(text) for text in texts]
    order = sorted(range(len(texts)), key=keys.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def encode_texts(encoder: SideEncoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised embeddings [N, D] in the input order."""
    out = torch.empty(len(texts), encoder.proj.out_features)
    tower = encoder.tower
    device = encoder.proj.weight.device  # the encoder may sit on a GPU; embeddings come back to the CPU
    ids = _token_ids(tower, texts)
    if ids is None:  # a tower that only tokenizes padded batches: sort by characters
        for batch in length_sorted_batches(texts, batch_size):
            tokens = tower.tokenize([texts[i] for i in batch])
            out[batch] = encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu()
        return out
    for batch in length_sorted_batches(texts, batch_size, [len(row) for row in ids]):
        input_ids, attention_mask = pad_batch([ids[i] for i in batch], tower.tokenizer)
        out[batch] = encoder(input_ids.to(device), attention_mask.to(device)).float().cpu()
    return out


def _token_ids(tower, texts: list[str]) -> list[list[int]] | None:
    """Unpadded token ids of every text, or None if the tower cannot tokenize without padding."""
    if "pad" not in inspect.signature(tower.tokenize).parameters or not texts:
        return None
    return list(tower.tokenize(texts, pad=False)["input_ids"])


def pad_batch(rows: list[list[int]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``rows`` padded to the longest, on the tokenizer's padding
    side with its pad id: the same tensors as tokenizing the batch with ``padding="longest"``."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask
