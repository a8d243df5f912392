"""A language pack's text side as one sentence-transformers module: ``MliltTextSide``.

The module holds what ``mlilt.load(PACK)`` builds for the pack's language (the tower copy with
the pack's method applied, its projection and the L2 normalisation), rebuilt through mlilt's
own code (``build_sides`` + ``load_state_strict``, run padding-free as serving is), so every
method exports the same way and ``SentenceTransformer(DIR).encode`` is ``encode_text``.

Its folder (``0_MliltTextSide/`` of an exported model) holds everything it needs; nothing is
looked up in mlilt's tower registry or cache when it loads::

    mlilt_text_side.json    what the folder is, and the sha256 of every file below
    pack/                   the pack's langpack.json + langpack.safetensors, byte for byte
    tower/                  the frozen text tower: Hugging Face weights and tokenizer

Loading checks, in this order: every file against the sha256 recorded at export (an edited
file is named), the pack as ``read_pack`` does, and the rebuilt tower against the fingerprint
the pack records (``check_tower``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mlilt.errors import PackError
from mlilt.modeling.model import SideEncoder
from mlilt.packs import PACK_CONFIG, PACK_TENSORS, Pack, read_pack
from mlilt.towers.hf_text import HFTextTower, load_hf_text, tokenizer_digest

try:  # sentence-transformers 5.x and 6.x
    from sentence_transformers.base.modules import InputModule
except ImportError:  # pragma: no cover - older layouts
    try:
        from sentence_transformers.models import InputModule
    except ImportError:
        from torch.nn import Module as InputModule

CONFIG_FILE = "mlilt_text_side.json"
FORMAT = "mlilt-text-side"
FORMAT_VERSION = 1
PACK_DIR, TOWER_DIR = "pack", "tower"


class MliltTextSide(InputModule):
    """Texts in, ``sentence_embedding`` out: the pack's text side, prefix and normalisation included.

    The pack's text prefix (``query: `` for mE5) is added in ``preprocess``, as mlilt's
    tokenization adds it; a sentence-transformers prompt, if one is passed, goes before the
    text and after that prefix would not: leave prompts unset.
    """

    config_file_name = CONFIG_FILE
    save_in_root = False  # its own folder: the files it checks are the files it owns

    def __init__(self, pack: Pack, tower: HFTextTower, side: SideEncoder | None = None):
        super().__init__()
        self.side = side if side is not None else text_side_on(pack, tower)
        self.language = pack.config.language
        self.method = pack.config.method
        self.embed_dim = pack.config.embed_dim
        # Kept out of the module tree: the tower's weights are the side's frozen weights (one copy).
        self.__dict__["_pack"] = pack
        self.__dict__["_tower"] = tower

    # ---- sentence-transformers' module interface

    @property
    def tokenizer(self):
        return self.side.tower.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.side.tower.max_length

    def get_embedding_dimension(self) -> int:
        return self.embed_dim

    def get_sentence_embedding_dimension(self) -> int:
        return self.embed_dim

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        texts = [text if isinstance(text, str) else str(text) for text in inputs]
        if prompt:
            texts = [prompt + text for text in texts]
        tokens = self.side.tower.tokenize(texts)  # the pack's prefix, truncation and padding
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def tokenize(self, texts, **kwargs) -> dict[str, torch.Tensor]:  # sentence-transformers < 5
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        features["sentence_embedding"] = self.side(features["input_ids"], features["attention_mask"])
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        write_module_folder(Path(output_path), self._pack, self._tower)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> "MliltTextSide":
        folder = Path(model_name_or_path) / subfolder
        if not folder.is_dir():  # a Hub repo: sentence-transformers fetches the folder
            folder = Path(cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token,
                                            cache_folder=cache_folder, revision=revision,
                                            local_files_only=local_files_only))
        return load_module_folder(folder)


def text_side_on(pack: Pack, tower: HFTextTower) -> SideEncoder:
    """``mlilt.speed.text_side_of`` on a tower given here (not the registry's): what ``mlilt.load`` serves."""
    from mlilt.speed import text_side_of

    return text_side_of(pack, tower)


# ---- the module's folder


def write_module_folder(folder: Path, pack: Pack, tower: HFTextTower) -> None:
    """Write ``folder``: the pack's files, the tower, and the config with every file's sha256."""
    from mlilt import __version__

    folder.mkdir(parents=True, exist_ok=True)
    (folder / PACK_DIR).mkdir(exist_ok=True)
    for name in (PACK_CONFIG, PACK_TENSORS):
        shutil.copyfile(pack.path / name, folder / PACK_DIR / name)
    save_tower(tower, folder / TOWER_DIR)
    text = pack.config.towers["text"]
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "mlilt_version": __version__,
              "language": pack.config.language, "method": pack.config.method, "embed_dim": pack.config.embed_dim,
              "text_tower": {"spec": tower.spec, "fingerprint": text["fingerprint"], "pooling": tower.pooling,
                             "max_length": tower.max_length, "prefix": tower.prefix},
              "tensors_sha256": pack.config.tensors_sha256,
              "files": {path: file_sha256(folder / path) for path in _owned_files(folder)}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tower(tower: HFTextTower, out: Path) -> None:
    """The frozen tower as a Hugging Face folder that loads back to the same fingerprint.

    A fast tokenizer keeps the truncation it was last called with in its backend (and would
    save it); the tokenizer is saved as it was when loaded, which is what the fingerprint holds."""
    import copy

    tower.model.save_pretrained(out, safe_serialization=True)
    tokenizer = tower.tokenizer
    if tokenizer_digest(tokenizer) != tower.tokenizer_slot.digest:
        tokenizer = copy.deepcopy(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
    if tokenizer_digest(tokenizer) != tower.tokenizer_slot.digest:
        raise PackError(f"text tower {tower.spec!r}: its tokenizer changed since it was loaded; "
                        f"cannot export it as the pack recorded it")
    tokenizer.save_pretrained(out)


def load_module_folder(folder: Path) -> MliltTextSide:
    config = _read_config(folder)
    check_files(folder, config)
    pack = read_pack(folder / PACK_DIR)
    info = config["text_tower"]
    tower = load_hf_text(info["spec"], folder / TOWER_DIR, pooling=info["pooling"], max_length=info["max_length"],
                         prefix=info["prefix"]).freeze()
    return MliltTextSide(pack, tower)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackError(f"{folder}: not an exported mlilt text side ({CONFIG_FILE} is missing)") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise PackError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PackError(f"{path}: not an mlilt text-side config (format {FORMAT!r} expected)")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise PackError(f"{path}: format version {config.get('format_version')!r} is newer than this mlilt "
                        f"reads ({FORMAT_VERSION}); upgrade mlilt")
    info = config.get("text_tower")
    if not (isinstance(info, dict) and isinstance(info.get("spec"), str) and isinstance(config.get("files"), dict)):
        raise PackError(f"{path}: text_tower and files must be recorded")
    return config


def check_files(folder: Path, config: dict) -> None:
    """Every file the folder owns must be the one exported: same names, same sha256."""
    recorded = config["files"]
    present = set(_owned_files(folder))
    for path in sorted(set(recorded) - present):
        raise PackError(f"{folder / path}: missing (recorded in {CONFIG_FILE} at export); export the pack again")
    for path in sorted(present - set(recorded)):
        raise PackError(f"{folder / path}: not part of the export (not in {CONFIG_FILE}); remove it or "
                        f"export the pack again")
    for path in sorted(recorded):
        if file_sha256(folder / path) != recorded[path]:
            raise PackError(f"{folder / path}: changed since export (its sha256 is not the one recorded in "
                            f"{CONFIG_FILE}); export the pack again")


def _owned_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for sub in (PACK_DIR, TOWER_DIR)
                  for p in (folder / sub).rglob("*") if p.is_file())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
