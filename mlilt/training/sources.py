"""Embeddings of a batch of captions or images, through caches when what runs is frozen.

Frozen means cached: when no image-tower weight trains, image features come from the feature
cache and the image tower never runs after the first pass; when only the top text blocks
train, the hidden states below them are kept per sentence (``mlilt.speed.text_cache``).
"""
from __future__ import annotations

import torch

from mlilt.data.feature_cache import FeatureCache, tower_features
from mlilt.data.images import load_image
from mlilt.modeling.encode import TokenizedTexts, run_in_length_groups
from mlilt.modeling.model import SideEncoder
from mlilt.speed.allocator import return_free_memory
from mlilt.training.config import TrainConfig
from mlilt.training.distributed import Ranks
from mlilt.training.progress import TrainProgress
from mlilt.data.split import Split


class TextSource:
    """Embeddings of a split's captions (or sentences), tokenized once; with ``prefix_cache``
    the frozen lower text blocks run once per sentence when the method allows it."""

    def __init__(self, encoder: SideEncoder, device: torch.device = torch.device("cpu"), prefix_cache: bool = False):
        from mlilt.speed.text_cache import PrefixCache, cut_point

        self.encoder = encoder
        self.device = device
        self.tokens: dict[str, TokenizedTexts] = {}
        cut = cut_point(encoder.tower) if prefix_cache else None
        self.cache = PrefixCache(encoder.tower, cut) if cut is not None else None

    def prepare(self, train_split: Split, val_split: Split) -> None:
        """Every caption tokenized once. The tokenizer is then handed back for the rest of the
        run (XLM-R's: ~250 MB) when the tower can load it again, and its memory returned."""
        for name, split in (("train", train_split), ("val", val_split)):
            self.tokenized(name, split)
        slot = getattr(self.encoder.tower, "tokenizer_slot", None)
        if all(t.standalone for t in self.tokens.values()) and slot is not None and slot.hand_back():
            return_free_memory()

    def embed(self, name: str, split: Split, indices: list[int]) -> torch.Tensor:
        tokens = self.tokenized(name, split)
        if self.cache is not None:
            return self.encoder.project(self.cache.features(name, indices, tokens, self.device))

        def run(group: list[int]) -> torch.Tensor:
            input_ids, attention_mask = tokens.batch([indices[i] for i in group])
            return self.encoder(input_ids.to(self.device), attention_mask.to(self.device))
        lengths = tokens.lengths(indices)
        # A padding-free tower needs no length groups: it groups captions for attention itself.
        # One call per batch made the text step 3-12% faster (benchmarks/perf/README.md); with
        # attention in groups it keeps no more at the peak.
        if lengths is None or getattr(self.encoder.tower, "runs_padding_free", False):
            return run(list(range(len(indices))))
        return run_in_length_groups(lengths, run)  # same embeddings, less padding

    def describe(self) -> str | None:
        """What the prefix cache holds; None when the run has none (nothing to report)."""
        return self.cache.describe() if self.cache is not None else None

    def tokenized(self, name: str, split: Split) -> TokenizedTexts:
        """The captions of ``split`` (called ``name``), tokenized on first use."""
        if name not in self.tokens:
            self.tokens[name] = TokenizedTexts(self.encoder.tower, split.captions)
        return self.tokens[name]


class ImageSource:
    """Image inputs for training: cached tower features when the tower is frozen, else pixels."""

    def __init__(self, encoder: SideEncoder, config: TrainConfig, device: torch.device = torch.device("cpu")):
        self.encoder = encoder
        self.device = device
        self.cached = not encoder.tower_trains()
        self.cache = FeatureCache(encoder.tower) if self.cached and config.cache_features else None
        self.features: dict[str, torch.Tensor] = {}

    def prepare(self, train_split: Split, val_split: Split, progress: TrainProgress,
                ranks: Ranks = Ranks()) -> None:
        """Tower features of both splits. Rank 0 goes first and fills the shared cache; the
        others then read it rather than racing to compute the same images."""
        if not self.cached:
            return
        if not ranks.is_main:
            ranks.barrier()
        splits = (("train", train_split), ("val", val_split)) if ranks.is_main else (("train", train_split),)
        for name, split in splits:  # only rank 0 validates
            with progress.task(f"image features ({name})", len(split.images)) as advance:
                self.features[name] = tower_features(self.encoder.tower, split.images, cache=self.cache,
                                                     sources=split.sources, progress=advance)
        if ranks.is_main:
            ranks.barrier()

    def embed(self, name: str, split: Split, indices: list[int]) -> torch.Tensor:
        if self.cached:
            return self.encoder.project(self.features[name][indices].to(self.device))
        pixels = torch.stack([self.encoder.tower.preprocess(load_image(split.images[i], split.sources[i]))
                              for i in indices])
        return self.encoder(pixels.to(self.device))
