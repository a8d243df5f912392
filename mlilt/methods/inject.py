"""How methods change a tower copy: make an existing weight trainable (a fresh copy, so the
shared frozen weight is never touched) or put a module in place of another."""
from __future__ import annotations

from torch import nn


def make_trainable(module: nn.Module, param_name: str) -> bool:
    """Replace ``module.<param_name>`` with a trainable copy; False if it already trains."""
    param = getattr(module, param_name)
    if param is None or param.requires_grad:
        return False
    setattr(module, param_name, nn.Parameter(param.detach().clone(), requires_grad=True))
    return True


def make_all_trainable(module: nn.Module, names: list[str] | None = None) -> int:
    """Make the named parameters (all, by default) trainable; returns how many were found."""
    wanted = set(names) if names is not None else None
    found = 0
    for qualified, _ in list(module.named_parameters()):
        if wanted is not None and qualified not in wanted:
            continue
        owner_name, _, param_name = qualified.rpartition(".")
        make_trainable(module.get_submodule(owner_name) if owner_name else module, param_name)
        found += 1
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def output_width(root: nn.Module, site: str) -> int:
    """Feature width at the output of ``site``: a Linear's out_features, a LayerScale's
    gamma, or else the width of the first LayerNorm of the enclosing block."""
    module = root.get_submodule(site)
    if isinstance(module, nn.Linear):
        return module.out_features
    gamma = getattr(module, "gamma", None)
    if gamma is not None:
        return gamma.numel()
    block = root.get_submodule(site.rpartition(".")[0])
    for child in block.modules():
        if isinstance(child, nn.LayerNorm):
            return child.normalized_shape[0]
    raise ValueError(f"cannot tell the width at {site}")
