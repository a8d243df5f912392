"""The one interface every tower follows: a frozen encoder with an id, a fingerprint and
its own preprocessing. Methods act on copies of a tower that share its frozen weights."""
from __future__ import annotations

import copy
import hashlib
import json

import torch
from torch import nn

from mlilt.defaults import DEFAULT_IMAGE_TOWER, DEFAULT_TEXT_TOWER
from mlilt.errors import TowerLoadError
from mlilt.files.mapped_bytes import file_mappings, tensor_bytes


class SharedFrom:
    """The loaded tower whose frozen weights a copy shares. Every copy holds it, so the loaded
    tower lives as long as any copy does (the registry holds loaded towers only weakly).
    Copying a model never copies the loaded tower through it."""

    __slots__ = ("tower",)

    def __init__(self, tower: "Tower"):
        self.tower = tower

    def __deepcopy__(self, memo) -> "SharedFrom":
        return self


class Tower(nn.Module):
    """A frozen encoder of one modality.

    Subclasses set ``side`` ("text" or "image"), ``width`` (feature size) and implement
    ``forward`` on already-prepared tensors. ``spec`` is the id a user typed
    (``me5-small``, ``xlm-roberta-base``, ``ViT-B-32:openai``); ``config`` is what besides
    the weights decides the output (pooling, prefix, preprocessing), part of the fingerprint.
    """

    side: str = ""

    def __init__(self, spec: str, width: int, config: dict):
        super().__init__()
        self.spec = spec
        self.width = width
        self.config = dict(config)
        self.shared_from: SharedFrom | None = None  # None: this is the loaded tower itself
        self._fingerprint: str | None = None

    def freeze(self) -> "Tower":
        """Freeze every weight and switch to eval mode (BatchNorm statistics stay fixed)."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Tower":
        # Towers always run in eval mode: dropout off, BatchNorm running statistics frozen.
        # What trains is decided by requires_grad, not by the module mode.
        return super().train(False)

    def fingerprint(self) -> str:
        """sha256 over the tower's config and its frozen weights, computed once."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self, {"spec_config": self.config, "class": type(self).__name__})
        return self._fingerprint

    def share_frozen_clone(self) -> "Tower":
        """A deep copy whose parameters, buffers and tokenizer are the same objects as ours.

        Methods then replace or wrap modules of the copy; the frozen weights stay one copy in
        memory however many languages are loaded. The copy keeps the loaded tower alive.
        """
        memo = {id(t): t for t in list(self.parameters()) + list(self.buffers())}
        for value in self.__dict__.values():
            if not isinstance(value, (nn.Module, torch.Tensor, dict, list)):
                memo[id(value)] = value  # tokenizers, transforms, runners: shared, never copied
        clone = copy.deepcopy(self, memo)
        clone.shared_from = self.shared_from or SharedFrom(self)
        clone._fingerprint = None  # methods will change the copy: it gets its own fingerprint
        return clone


def weights_fingerprint(module: nn.Module, config: dict) -> str:
    """sha256 of a JSON config plus every parameter and buffer (names, shapes, bytes).
    Weights memory-mapped from a file are hashed through the file: hashing them in memory
    would page in all of them (``mlilt.files.mapped_bytes``)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    state = module.state_dict()
    mappings = file_mappings()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            for chunk in tensor_bytes(tensor, mappings):
                digest.update(chunk)
    return digest.hexdigest()


def load_error(spec: str, kind: str, error: Exception) -> TowerLoadError:
    """The error of a tower that could not be loaded from a hub name or folder."""
    return TowerLoadError(
        f"could not load tower {spec!r} as {kind}: {error}. Hub names need a network or a copy in the "
        f"local cache; offline, use the embedded towers ({DEFAULT_TEXT_TOWER}, {DEFAULT_IMAGE_TOWER}) "
        f"or a local folder.")
