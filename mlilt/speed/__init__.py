"""CPU speed paths: each computes what the plain PyTorch path computes, with less time or memory.

Training turns them on in ``mlilt.training.assemble``; serving and evaluation take their text
sides from :func:`text_side_of` here.
"""
from __future__ import annotations


def text_side_of(pack):
    """The pack's text side (``mlilt.modeling.factory.text_side_of``), run padding-free."""
    from mlilt.modeling.factory import text_side_of as plain_text_side_of
    from mlilt.speed.packed import use_padding_free

    side = plain_text_side_of(pack)
    use_padding_free(side.tower)
    return side
