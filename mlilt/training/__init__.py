"""Training of language packs: ``train(config)``, or ``Trainer(config, callbacks=[...]).run()``.

The names below load on first use, so that reading ``TrainConfig`` (the CLI, study configs)
does not import the training loop.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"train": "trainer", "Trainer": "trainer", "TrainResult": "trainer", "TrainConfig": "config",
            "Callback": "callbacks", "StepInfo": "callbacks"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
