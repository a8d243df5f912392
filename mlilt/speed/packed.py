"""Padding-free forward for BERT-family text towers (BERT, XLM-R, mBERT, mE5).

A batch of captions is padded to its longest caption, and every linear layer, LayerNorm, GELU,
adapter and LoRA delta then costs as much on a padding position as on a real token (15% of the
positions of a length-grouped training batch of demo captions, a quarter of a random one). Here
the per-token layers run on the real tokens only, packed as [tokens, width]; attention alone
sees the padded batch, one caption per row, because it mixes tokens of one caption.

Each row of a per-token layer is computed on its own, so the result is the model's own forward
(bit for bit on CPU in ``tests/test_padding_free.py``, with attention in one call). On a CPU,
attention runs in groups of captions of about the same length (``Packing.attention_groups``),
each padded only to its own longest: the batch is sorted by length for that, and put back in
order at the end; a caption padded to a shorter length sums its attention in another order,
so there the result is the same to float rounding. The same module objects run, so methods
that wrap or parametrize them (adapters, LoRA, trained LayerNorms) need nothing new.

Used only for encoders with absolute positions, no decoder and no cross-attention
(``why_not_packable``). A text tower runs it once ``use_padding_free`` sets ``PaddingFree`` as
its runner; the tower compares the packed forward with the model's own on its first batch and
falls back for good if they disagree: a transformers release whose layers do more, or a
subclass with its own ``forward``, cannot give wrong features silently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlilt.speed.grad_checkpoint import checkpointed, is_checkpointed
from mlilt.towers.hf_text import HFTextTower

# Captions per attention call on a CPU. Attention's cost grows with the square of the padded
# length, and the CPU kernel pays per call too. In groups of 8 an anchored ln+adapter step on
# the offline tower took 0.89 CPU s against 0.92 s in one call, and 130 MB less at the peak.
ATTENTION_GROUP = 8


class Packing:
    """Where the real tokens of a padded batch are: packs [B, S, ...] into [N, ...] and back."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)
        self.attention_mask = attention_mask
        flat = attention_mask.reshape(-1).bool()
        self.index = None if bool(flat.all()) else flat.nonzero().squeeze(1)  # None: nothing to drop
        self._additive: dict[torch.dtype, torch.Tensor] = {}
        self._groups: list["Packing"] | None = None

    @classmethod
    def of_lengths(cls, lengths: list[int], device: torch.device) -> "Packing":
        """The packing of right-padded rows of these lengths."""
        positions = torch.arange(max(lengths), device=device)
        return cls((positions[None, :] < torch.tensor(lengths, device=device)[:, None]).long())

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        flat = padded.flatten(0, 1)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] with zeros at the padding positions."""
        if self.index is not None:
            packed = _Unpack.apply(packed, self.index, self.shape[0] * self.shape[1])
        return packed.view(*self.shape, *packed.shape[1:])

    @property
    def tokens(self) -> int:
        """How many real tokens the batch has: the rows of its packed form."""
        return self.shape[0] * self.shape[1] if self.index is None else len(self.index)

    def attention_groups(self) -> list["Packing"]:
        """The packing of each attention call, in packed order. On a CPU, for rows sorted by
        length: groups of ``ATTENTION_GROUP`` consecutive captions, each padded (on the right)
        to its own longest only; a caption's tokens are consecutive packed rows whichever side
        it was padded on, and attention does not care where the padding is once positions are
        embedded. Otherwise the batch at once."""
        if self._groups is None:
            lengths = self.attention_mask.sum(1).tolist()
            if not _attends_in_groups(len(lengths), self.attention_mask.device) or lengths != sorted(lengths):
                self._groups = [self]
            else:
                self._groups = [Packing.of_lengths(lengths[first:first + ATTENTION_GROUP], self.attention_mask.device)
                                for first in range(0, len(lengths), ATTENTION_GROUP)]
        return self._groups

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, S]: 0 for a real key, the dtype's lowest value for padding. Built in the
        query's dtype: fp32's lowest rounds to -inf in bf16, and a row of -inf gives NaN."""
        if dtype not in self._additive:
            keep = self.attention_mask[:, None, None, :].to(dtype)
            self._additive[dtype] = (1.0 - keep) * torch.finfo(dtype).min
        return self._additive[dtype]


def _attends_in_groups(captions: int, device: torch.device) -> bool:
    """Whether a batch of ``captions`` runs attention in length groups: on a CPU, more than
    ``ATTENTION_GROUP`` of them (fewer run in one call, needing no sort)."""
    return device.type == "cpu" and captions > ATTENTION_GROUP


class _Unpack(torch.autograd.Function):
    """Scatter packed rows into zeros. Autograd's own ``index_copy`` keeps its source alive for
    the backward pass, only for its shape: three [tokens, width] tensors per layer (54 MB for
    a batch of 32 captions on the offline tower). This one keeps the index."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return packed.new_zeros(rows, *packed.shape[1:]).index_copy_(0, index, packed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def why_not_packable(model: nn.Module) -> str | None:
    """None if ``model`` is an encoder this module can run padding-free, else the reason."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if config is None or getattr(model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
        return "not a BERT-family encoder (embeddings, encoder.layer)"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder or cross-attention model"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"{config.position_embedding_type} position embeddings change attention"
    for layer in layers:
        if not _laid_out_as_bert(layer):
            return f"layers of class {type(layer).__name__} are not laid out as BERT's"
    return None


def _laid_out_as_bert(layer: nn.Module) -> bool:
    """Whether ``layer`` has the parts ``packed_block`` calls."""
    attention = getattr(layer, "attention", None)
    scores = getattr(attention, "self", None)
    needed = [(scores, name) for name in ("query", "key", "value", "num_attention_heads", "attention_head_size")]
    needed += [(attention, "output"), (layer, "intermediate"), (layer, "output")]
    return all(getattr(owner, name, None) is not None for owner, name in needed)


def packed_block(layer: nn.Module, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One BERT layer on packed tokens [N, width]: what ``BertLayer.forward`` computes in eval
    mode, with only the attention product on padded captions."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    groups = packing.attention_groups()
    projected = [linear(hidden) for linear in (attention.query, attention.key, attention.value)]
    if len(groups) == 1:
        context = _attend(packing, projected, heads, size)
    else:  # split, not sliced: a slice's backward pass makes zeros as large as the whole per group
        parts = [p.split([group.tokens for group in groups]) for p in projected]
        context = torch.cat([_attend(group, [part[i] for part in parts], heads, size)
                             for i, group in enumerate(groups)])
    attended = layer.attention.output(context, hidden)
    return layer.output(layer.intermediate(attended), attended)


def _attend(packing: Packing, projected: list[torch.Tensor], heads: int, size: int) -> torch.Tensor:
    """Scaled dot-product attention of packed queries, keys and values of one padded batch."""
    batch, length = packing.shape
    query, key, value = (packing.unpack(p).view(batch, length, heads, size).transpose(1, 2) for p in projected)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=packing.additive_mask(query.dtype),
                                             scale=size ** -0.5)
    return packing.pack(context.transpose(1, 2).reshape(batch, length, heads * size))


def run_packed_blocks(layers, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """``layers`` in turn over packed tokens; a layer wrapped for gradient checkpointing stays so."""
    for layer in layers:
        run = checkpointed(packed_block) if is_checkpointed(layer) else packed_block
        hidden = run(layer, hidden, packing)
    return hidden


def packed_last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state [B, S, width], zeros at padding positions. The embeddings
    run on the padded batch: XLM-R derives position ids from where the padding is. On a CPU
    the captions of a batch that attends in groups run sorted by length (for
    ``Packing.attention_groups``) and come back in order."""
    grouped = _attends_in_groups(len(attention_mask), attention_mask.device)
    order = attention_mask.sum(1).argsort(stable=True) if grouped else None
    if order is not None and torch.equal(order, torch.arange(len(order))):
        order = None  # sorted already
    if order is not None:
        input_ids, attention_mask = input_ids[order], attention_mask[order]
    packing = Packing(attention_mask)
    hidden = packing.pack(model.embeddings(input_ids=input_ids))
    last = packing.unpack(run_packed_blocks(model.encoder.layer, hidden, packing))
    return last if order is None else last[order.argsort()]


class PaddingFree:
    """The text tower runner (``HFTextTower.use_runner``) of this module: the encoder's last
    hidden state with the per-token layers on the real tokens only."""

    def why_not(self, model: nn.Module) -> str | None:
        return why_not_packable(model)

    def last_hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return packed_last_hidden(model, input_ids, attention_mask)


PADDING_FREE = PaddingFree()


def use_padding_free(tower: nn.Module) -> bool:
    """Run a text tower (a training or serving copy) padding-free; whether it now does. Other
    towers, and encoders this module cannot run, are left as they are."""
    if not isinstance(tower, HFTextTower):
        return False
    tower.use_runner(PADDING_FREE)
    return tower.runs_padding_free
