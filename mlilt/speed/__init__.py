"""CPU speed paths: each computes what the plain PyTorch path computes, with less time or memory.

One switch turns them on: ``speed_paths`` (``mlilt train --speed-paths``), ``default`` for every
path that is on by default, ``none`` for the plain PyTorch path, or a comma list of names from
:data:`SPEED_PATHS`. Training sets them on each side in ``mlilt.training.assemble``
(:func:`speed_up`); serving and evaluation take their text sides from :func:`text_side_of`.
The memory options (``--grad-checkpointing``, ``--recompute-norms``) trade time for memory and
have switches of their own.
"""
from __future__ import annotations

from mlilt.errors import UsageError

# name -> what it does; every one is on by default (benchmarks/perf/speed_paths.py measures each).
SPEED_PATHS = {
    "padding-free": "BERT-family text towers run linear layers, norms and adapters on real tokens only",
    "channels-last": "convolutional image towers run in channels-last memory layout",
    "lean-backward": "frozen convolutions and BatchNorm+ReLU6 keep less for the backward pass",
    "math-attention": "under --bf16 on a CPU, attention runs PyTorch's math kernel, not the flash kernel",
    "text-prefix-cache": "when only the top text blocks train (top:K, unlock:K), the blocks below them run once per "
                         "sentence",
}


def parse_speed_paths(value: str) -> frozenset[str]:
    """The speed paths ``value`` names: ``default``, ``none`` or a comma list of names."""
    if value == "default":
        return frozenset(SPEED_PATHS)
    if value == "none":
        return frozenset()
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SPEED_PATHS))
    if unknown or not names:
        raise UsageError(f"--speed-paths {value!r}: unknown {', '.join(unknown) or 'empty list'}; "
                         f"give default, none, or a comma list of {', '.join(SPEED_PATHS)}")
    return frozenset(names)


def speed_up(encoder, paths: frozenset[str]) -> None:
    """Set ``paths`` on one side of a training model (an ``mlilt.modeling.model.SideEncoder``)."""
    from mlilt.speed.lean_backward import lean_convolutions, lean_norm_clamps
    from mlilt.speed.packed import use_padding_free

    tower = encoder.tower
    if "padding-free" in paths:
        use_padding_free(tower)
    elif hasattr(tower, "padding_free"):
        tower.padding_free = False  # the model's own padded forward, whatever runner it was given
    if "channels-last" not in paths and getattr(tower, "channels_last", False):
        plain_layout(tower)
    if "lean-backward" in paths and encoder.tower_trains():
        lean_convolutions(tower)
        lean_norm_clamps(tower)


def plain_layout(tower) -> None:
    """A convolutional image tower back in PyTorch's default (contiguous) memory layout."""
    import torch

    tower.channels_last = False
    tower.model.to(memory_format=torch.contiguous_format)


def text_side_of(pack, tower=None):
    """The pack's text side (``mlilt.modeling.factory.text_side_of``), run padding-free."""
    from mlilt.modeling.factory import text_side_of as plain_text_side_of
    from mlilt.speed.packed import use_padding_free

    side = plain_text_side_of(pack, tower)
    use_padding_free(side.tower)
    return side
