"""Parameter-efficient methods: which parameters exist and train in each tower."""
from mlilt.methods.registry import DEFAULT_METHOD, METHODS, MethodReport, apply_methods, describe_methods, method_sides
from mlilt.methods.spec import parse_method

__all__ = ["DEFAULT_METHOD", "METHODS", "MethodReport", "apply_methods", "describe_methods", "method_sides",
           "parse_method"]
