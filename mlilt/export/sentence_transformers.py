"""``mlilt packs export PACK --format sentence-transformers``: a pack's text side as a
sentence-transformers model folder.

The folder is one ``MliltTextSide`` module (``mlilt/export/st_module.py``) that carries the
pack's files and a copy of the frozen text tower, so it loads with mlilt installed and nothing
else: no tower registry, no mlilt cache, no network::

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(DIR, trust_remote_code=True)  # ST 6.x: any non-ST module class
    model.encode(["mtoto anacheza"])  # == mlilt.load(PACK).encode_text([...], lang="sw")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mlilt.errors import PackError, UsageError
from mlilt.files import atomic

README = """# {language} text encoder (mlilt pack, {method})

The text side of an mlilt language pack as a sentence-transformers model: the frozen text
tower `{spec}`, the pack's `{method}` parameters, its projection to {embed_dim} dimensions
and L2 normalisation. Its embeddings are the ones `mlilt.load(PACK).encode_text(texts,
lang="{language}")` gives, in the pack's image–text space.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}", trust_remote_code=True)
embeddings = model.encode(["..."])
```

Loading needs mlilt installed: the module class is `mlilt.export.st_module.MliltTextSide`
(sentence-transformers 6 asks `trust_remote_code=True` for any module class outside its own
package). The text prefix {prefix!r} is added by the module: pass no prompt. Every file in
`0_MliltTextSide/` is checked against the sha256 recorded at export when it loads.
"""


def export_sentence_transformers(pack: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``out``: a sentence-transformers folder whose ``encode`` is the pack's ``encode_text``."""
    from sentence_transformers import SentenceTransformer

    from mlilt.export.st_module import MliltTextSide, TOWER_DIR
    from mlilt.packs import read_pack
    from mlilt.speed import text_side_of
    from mlilt.towers.hf_text import load_hf_text

    out = Path(out)
    check_destination(out, overwrite)
    loaded = read_pack(pack)
    side = text_side_of(loaded)  # what mlilt.load serves for this language
    tower = side.tower.shared_from.tower  # the loaded (frozen) tower its weights come from
    module = MliltTextSide(loaded, tower, side=side)
    model = SentenceTransformer(modules=[module], device="cpu")
    with atomic.staged_dir(out, replace=True) as stage:
        model.save(str(stage), create_model_card=False)
        _mark_plain_prompts(stage)
        subfolder = stage / f"0_{MliltTextSide.__name__}"
        saved = load_hf_text(tower.spec, subfolder / TOWER_DIR, pooling=tower.pooling, max_length=tower.max_length,
                             prefix=tower.prefix)
        if saved.fingerprint() != loaded.config.towers["text"]["fingerprint"]:  # never expected
            raise PackError(f"{loaded.path}: the text tower {tower.spec!r} does not save to a folder that loads "
                            f"back to the same weights; nothing was exported")
        text = loaded.config.towers["text"]
        (stage / "README.md").write_text(README.format(
            language=loaded.config.language, method=loaded.config.method, spec=text["spec"],
            embed_dim=loaded.config.embed_dim, name=out.name, prefix=tower.prefix), encoding="utf-8")
    return out


def _mark_plain_prompts(folder: Path) -> None:
    """No prompts in the saved config: the module adds the pack's prefix itself."""
    path = folder / "config_sentence_transformers.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["prompts"], config["default_prompt_name"] = {}, None
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; never replace a folder that is not a model export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / "modules.json").is_file():
        raise UsageError(f"{out} is not a sentence-transformers folder; --overwrite replaces only an earlier "
                         f"export: choose another --out")
