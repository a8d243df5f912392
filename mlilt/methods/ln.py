"""``ln``: train the affine parameters of every normalisation layer (LilT's LayerNorm tuning).

In CNN towers this is BatchNorm/GroupNorm scale and shift; BatchNorm running statistics stay
frozen because towers always run in eval mode.
"""
from __future__ import annotations

from torch import nn

from mlilt.methods.base import Scope, method
from mlilt.methods.inject import make_trainable

NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    # Some libraries define their own LayerNorm/RMSNorm classes that do not subclass torch's.
    name = type(module).__name__
    return isinstance(module, NORM_TYPES) or name.endswith(("LayerNorm", "RMSNorm", "LayerNorm2d"))


def apply(tower: nn.Module, arg: int | None, scope: Scope) -> int:
    found = 0
    for name, module in tower.named_modules():
        if is_norm(module) and getattr(module, "weight", None) is not None and scope(name):
            make_trainable(module, "weight")
            if getattr(module, "bias", None) is not None:
                make_trainable(module, "bias")
            found += 1
    return found


METHOD = method("ln", apply)
