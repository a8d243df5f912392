"""mlilt: language packs for CLIP-like image-text models.

Freeze a multilingual text encoder and an image tower, train a few MB of parameters per
language, and load them by name: ``mlilt.load('sw').encode_text([...], lang='sw')``.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "list_packs", "MliltModel", "create_model_and_transforms", "get_tokenizer"]


def __getattr__(name: str):
    # Importing mlilt stays cheap (the CLI's --help should not wait for torch).
    if name in ("load", "MliltModel"):
        from mlilt import api
        return getattr(api, name)
    if name in ("create_model_and_transforms", "get_tokenizer"):
        from mlilt import clip_model
        return getattr(clip_model, name)
    if name == "list_packs":
        from mlilt.packs import list_packs
        return list_packs
    raise AttributeError(f"module 'mlilt' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy attributes above are the public API: dir(mlilt) and tab completion show them.
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
