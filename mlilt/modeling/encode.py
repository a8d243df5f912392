"""Batched, gradient-free encoding shared by the API, validation and evaluation.

Captions are tokenized once, sorted by token count and padded per batch to the longest caption
of that batch, never to a fixed length: the text tower's cost follows the real tokens. A
training batch keeps its random captions (they are each other's negatives) and is run in a few
groups of similar length instead (``length_groups``): the same embeddings, less padding. A tower
that runs padding-free (``speed/packed.py``) needs groups only to keep attention compact; it
takes a batch in one call when the image tower does not run in the same step (``TextSource``).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from mlilt.modeling.model import SideEncoder


def length_sorted_batches(texts: list[str], batch_size: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Index batches of similar length (``lengths``, else characters): padding per batch then
    wastes little compute. Equal lengths keep their input order."""
    keys = lengths if lengths is not None else [len(text) for text in texts]
    order = sorted(range(len(texts)), key=keys.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# What one more tower call costs, in padded token positions: measured on the offline text tower
# (benchmarks/perf/README.md, "length groups"); it keeps a batch from splitting into slivers.
GROUP_CALL_TOKENS = 96


def length_groups(lengths: list[int], call_tokens: int | None = None) -> list[list[int]]:
    """Positions of ``lengths`` in groups of similar length, chosen to minimise the padded
    token positions the groups cost (each padded to its longest) plus ``call_tokens`` per group.

    Runs of equal lengths are never split, so the search is over distinct lengths (at most the
    tower's max length), whatever the batch size."""
    call_tokens = GROUP_CALL_TOKENS if call_tokens is None else call_tokens
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    values = sorted(set(lengths))
    counts = [0] * (len(values) + 1)  # counts[k]: captions shorter than values[k]
    for k, value in enumerate(values):
        counts[k + 1] = counts[k] + lengths.count(value)
    best = [0.0] + [float("inf")] * len(values)  # best[k]: cost of the k shortest distinct lengths
    cut = [0] * (len(values) + 1)
    for k in range(1, len(values) + 1):
        for start in range(k):
            cost = best[start] + (counts[k] - counts[start]) * values[k - 1] + call_tokens
            if cost < best[k]:
                best[k], cut[k] = cost, start
    bounds, k = [], len(values)
    while k:
        bounds.append((counts[cut[k]], counts[k]))
        k = cut[k]
    return [order[a:b] for a, b in reversed(bounds)]


def run_in_length_groups(lengths: list[int], run: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """``run`` over each length group, rows put back in input order (gradients flow through)."""
    groups = length_groups(lengths)
    if len(groups) == 1:  # no reordering needed
        return run(list(range(len(lengths))))
    rows = torch.cat([run(group) for group in groups])
    positions = torch.tensor([i for group in groups for i in group], device=rows.device)
    return rows[torch.argsort(positions)]


@torch.no_grad()
def encode_texts(encoder: SideEncoder, texts: list[str], batch_size: int = 64, progress=None) -> torch.Tensor:
    """Normalised embeddings [N, D] in the input order; ``progress(n)`` hears each batch."""
    out = torch.empty(len(texts), encoder.proj.out_features)
    device = encoder.proj.weight.device  # the encoder may sit on a GPU; embeddings come back to the CPU
    tokens = TokenizedTexts(encoder.tower, texts)
    for batch in length_sorted_batches(texts, batch_size, tokens.lengths()):
        input_ids, attention_mask = tokens.batch(batch)
        out[batch] = encoder(input_ids.to(device), attention_mask.to(device)).float().cpu()
        if progress is not None:
            progress(len(batch))
    return out


class TokenizedTexts:
    """Texts tokenized once, as unpadded token ids, and padded per batch to that batch's
    longest: the same tensors as tokenizing the batch with ``padding="longest"``. Once made it
    needs no tokenizer (``standalone``), unless the tower only tokenizes padded batches; then
    each batch is tokenized as it comes."""

    def __init__(self, tower, texts: list[str]):
        self.tower, self.texts = tower, texts
        self.ids = token_ids(tower, texts)
        tokenizer = tower.tokenizer if self.ids is not None else None
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    @property
    def standalone(self) -> bool:
        return self.ids is not None

    def lengths(self, indices: list[int] | None = None) -> list[int] | None:
        """Token counts of ``indices`` (all texts if None); None for a tower that only pads."""
        if self.ids is None:
            return None
        return [len(self.ids[i]) for i in (range(len(self.ids)) if indices is None else indices)]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of ``indices``, padded to the longest of them."""
        if self.ids is None:
            tokens = self.tower.tokenize([self.texts[i] for i in indices])
            return tokens["input_ids"], tokens["attention_mask"]
        return pad_rows([self.ids[i] for i in indices], self.pad_id, self.left)


def token_ids(tower, texts: list[str]) -> list[list[int]] | None:
    """Unpadded token ids of every text, or None if the tower cannot tokenize without padding."""
    if "pad" not in inspect.signature(tower.tokenize).parameters:
        return None
    return list(tower.tokenize(texts, pad=False)["input_ids"]) if texts else []


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``rows`` padded to the longest with ``pad_id``, on the
    left or the right as the tokenizer pads."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask
