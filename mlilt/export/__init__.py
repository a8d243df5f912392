"""Exporting a language pack into other libraries' formats: ``export_pack(pack, fmt, out)``.

- ``sentence-transformers``: the pack's text side as a sentence-transformers model folder
  (``mlilt/export/sentence_transformers.py``; docs/export.md).
- ``peft``: the pack's text-side parameters as a PEFT adapter (``mlilt/export/peft.py``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mlilt.errors import UsageError

FORMATS = ("sentence-transformers", "peft")


def export_pack(pack: str | os.PathLike, fmt: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``pack`` (a folder or indexed name) to ``out`` in format ``fmt``; returns ``out``.

    An existing, non-empty ``out`` is refused unless ``overwrite``."""
    if fmt == "sentence-transformers":
        from mlilt.export.sentence_transformers import export_sentence_transformers
        return export_sentence_transformers(pack, out, overwrite=overwrite)
    if fmt == "peft":
        if importlib.util.find_spec("mlilt.export.peft") is None:
            raise UsageError("export format 'peft' is not available in this mlilt (mlilt/export/peft.py is missing)")
        from mlilt.export.peft import export_peft
        from mlilt.packs import resolve_pack
        return Path(export_peft(resolve_pack(pack), out, overwrite=overwrite))
    raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
