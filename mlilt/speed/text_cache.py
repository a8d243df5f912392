"""Frozen means cached, inside the text tower: when nothing below block C trains (``unlock:K``
or ``ln+adapter+top:K`` train only the top K blocks), the hidden states entering block C are
a pure function of the sentence. They are computed once per sentence, kept in memory unpadded
([tokens, width] each), and later steps run only blocks C.. and the pooling. Distillation
revisits the same sentences every epoch, so from the second epoch a step runs a third of
the tower with ``top:4`` on a 12-block tower (``benchmarks/perf/distill_vs_st.py``).

Only Hugging Face BERT-family towers (BERT, XLM-R, mBERT, mE5, and sentence-transformers
folders around them: ``embeddings`` then ``encoder.layer``) are split; any other tower, or a
method that trains anything below block 1 (``ln`` trains the embeddings' LayerNorm), runs the
whole tower. A self-check on the first batch compares the split forward with the whole tower
and turns the cache off if they disagree (a transformers version whose layers want another
mask format, say).
"""
from __future__ import annotations

import torch
from torch import nn

from mlilt.modeling.encode import TokenizedTexts, run_in_length_groups
from mlilt.speed.packed import Packing, run_packed_blocks
from mlilt.towers.hf_text import HFTextTower, disagreement
from mlilt.towers.layout import find_layout


def first_trainable_block(tower: nn.Module) -> int | None:
    """Index of the lowest block holding a trainable parameter; the block count if only
    layers after the blocks train; None if no block layout is known or something before
    the blocks trains (then nothing can be cached)."""
    layout = find_layout(tower)
    if not layout.blocks:
        return None
    lowest = len(layout.blocks)
    tail = set(layout.tail_params)
    for name, param in tower.named_parameters():
        if not param.requires_grad or name in tail:
            continue
        block = next((i for i, b in enumerate(layout.blocks) if name.startswith(b + ".")), None)
        if block is None:
            return None  # trains before (or beside) the blocks: embeddings, an input norm
        lowest = min(lowest, block)
    return lowest


def cut_point(tower: nn.Module) -> int | None:
    """The block index to cache below, or None when this tower cannot use a prefix cache."""
    if not isinstance(tower, HFTextTower):
        return None
    model = tower.model
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        return None
    layout = find_layout(tower)
    if layout.family != "bert" or layout.blocks != [f"model.encoder.layer.{i}" for i in range(len(layers))]:
        return None
    cut = first_trainable_block(tower)
    return cut if cut is not None and cut >= 1 else None  # below block 1 only the embeddings: not worth it


def _run_layers(layers, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``layers`` through their own (padded) forward, for a tower that does not run padding-free."""
    mask = packing.additive_mask(hidden.dtype)
    for layer in layers:
        out = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns tuples
    return hidden


LIMIT_BYTES = 4 * 2**30  # past this, sentences not yet cached run the whole tower


class PrefixCache:
    """Per-sentence hidden states entering block ``cut``, filled lazily, in memory.

    ``limit_bytes`` bounds the memory: once the cache would pass it, sentences not yet cached
    run the whole tower (the cache stops growing; nothing is evicted, so the hits stay).
    """

    def __init__(self, tower: HFTextTower, cut: int, limit_bytes: int = LIMIT_BYTES):
        self.tower = tower
        self.cut = cut
        self.limit_bytes = limit_bytes
        self.states: dict[tuple[str, int], torch.Tensor] = {}
        self.bytes = 0
        self.full = False  # reached the limit, or turned off by the self-check
        self.checked = False
        self.problem: str | None = None  # why the self-check turned the cache off

    @property
    def layers(self):
        return self.tower.model.encoder.layer

    def features(self, key: str, indices: list[int], tokens: TokenizedTexts, device: torch.device) -> torch.Tensor:
        """Pooled tower features [B, width] of the sentences ``indices`` of ``tokens`` (``key``
        names that set of sentences)."""
        missing = [i for i in indices if (key, i) not in self.states]
        if missing and self.full:
            return self._whole_tower(tokens, indices, device)
        if missing:
            self._fill(key, missing, tokens, device)
            if not self.checked:
                self._self_check(key, indices, tokens, device)
            if any((key, i) not in self.states for i in indices):  # the limit was reached or the check failed
                return self._whole_tower(tokens, indices, device)
        states = [self.states[(key, i)] for i in indices]
        if self.tower.runs_padding_free:  # only attention sees padding: one call for the batch
            return self._top(states, device)
        return run_in_length_groups([len(state) for state in states],
                                    lambda group: self._top([states[j] for j in group], device))

    def _top(self, states: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Pooled features from cached states: blocks ``cut``.. only."""
        packing = Packing.of_lengths([len(state) for state in states], device)
        hidden = self._blocks(self.layers[self.cut:], torch.cat(states).to(device), packing)
        return self.tower.pool_hidden(packing.unpack(hidden), packing.attention_mask)

    def _blocks(self, layers, packed: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``layers`` over packed hidden states: padding-free when the tower runs so, else
        through the layers' own padded forward."""
        if self.tower.runs_padding_free:
            return run_packed_blocks(layers, packed, packing)
        return packing.pack(_run_layers(layers, packing.unpack(packed), packing))

    def _whole_tower(self, tokens: TokenizedTexts, indices: list[int], device: torch.device) -> torch.Tensor:
        input_ids, attention_mask = tokens.batch(indices)
        return self.tower(input_ids.to(device), attention_mask.to(device))

    @torch.no_grad()
    def _fill(self, key: str, indices: list[int], tokens: TokenizedTexts, device: torch.device) -> None:
        input_ids, attention_mask = tokens.batch(indices)
        ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        packing = Packing(attention_mask)
        packed = self._blocks(self.layers[:self.cut], packing.pack(self.tower.model.embeddings(input_ids=ids)), packing)
        for i, state in zip(indices, packed.split(attention_mask.sum(1).tolist())):
            state = state.clone()  # unpadded: memory follows the real sentence lengths
            size = state.numel() * state.element_size()
            if self.bytes + size > self.limit_bytes:
                self.full = True
                return
            self.states[(key, i)] = state
            self.bytes += size

    @torch.no_grad()
    def _self_check(self, key: str, indices: list[int], tokens: TokenizedTexts, device: torch.device) -> None:
        """Once: the split forward must give the whole tower's features, else drop the cache."""
        self.checked = True
        if any((key, i) not in self.states for i in indices):
            return
        split = self._top([self.states[(key, i)] for i in indices], device)
        whole = self._whole_tower(tokens, indices, device)
        difference = disagreement(split, whole)
        if difference is not None:
            self.states.clear()
            self.bytes, self.full = 0, True
            self.problem = (f"off: the split forward differs from the whole tower by {difference:.2g}; "
                            f"every step runs the whole tower")

    def describe(self) -> str:
        if self.problem:
            return f"text prefix cache: {self.problem}"
        state = "limit reached: later sentences run the whole tower" if self.full else "within the limit"
        return (f"text prefix cache: blocks below {self.cut} of {len(self.layers)} cached for {len(self.states)} "
                f"sentences, {self.bytes / 2**20:.1f} MiB ({state}; limit {self.limit_bytes / 2**20:.0f} MiB)")
