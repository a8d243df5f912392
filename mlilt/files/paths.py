"""Where mlilt keeps what it builds once and reuses: converted towers, feature caches."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MLILT_CACHE"


def cache_dir() -> Path:
    """The user cache (``$MLILT_CACHE`` or ``~/.cache/mlilt``), created on first use."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlilt").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
