"""Parameter-efficient methods: which parameters exist and train in each tower.

Names resolve lazily: parsing a spec or printing --help does not import torch.
"""
from mlilt.defaults import DEFAULT_METHOD
from mlilt.methods.catalog import CATALOG, describe_methods
from mlilt.methods.spec import parse_method

__all__ = ["CATALOG", "DEFAULT_METHOD", "METHODS", "MethodReport", "apply_methods", "describe_methods", "parse_method"]


def __getattr__(name: str):
    if name in ("METHODS", "MethodReport", "apply_methods"):
        from mlilt.methods import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'mlilt.methods' has no attribute {name!r}")
