"""Language packs: ``langpack.json`` (what, for which towers, how trained, how good) and
``langpack.safetensors`` (the trained tensors only). Loaded from JSON + safetensors only —
never pickle — and checked against the towers before any tensor touches a model."""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mlilt import atomic
from mlilt.errors import PackError, UsageError
from mlilt.model import ContrastiveModel, image_side_id

PACK_CONFIG = "langpack.json"
PACK_TENSORS = "langpack.safetensors"
FORMAT_VERSION = 1
PACKS_ENV = "MLILT_PACKS"
INDEX_FILE = "index.json"


@dataclass
class PackConfig:
    language: str
    method: str  # the text side's method (and the image side's, when not anchored)
    image_method: str  # the method that made the image side (the anchor's when anchored)
    embed_dim: int
    towers: dict  # side -> {"spec", "fingerprint", "options"}
    image_side_id: str  # packs with the same id share one image embedding space
    anchor: dict | None = None  # {"name", "image_side_id"} when trained against an anchor
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    mlilt_version: str = ""
    created: str = ""

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "PackConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:  # written by a newer mlilt: load what we understand, say what we skip
            warnings.warn(f"{where}: ignoring unknown keys {unknown} (written by mlilt "
                          f"{raw.get('mlilt_version', '?')})", stacklevel=3)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = sorted(name for name in required if name not in raw)
        if missing:
            raise PackError(f"{where}: missing keys {missing}")
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if not isinstance(config.format_version, int) or config.format_version > FORMAT_VERSION:
            raise PackError(f"{where}: format version {config.format_version!r} is newer than this mlilt "
                            f"reads ({FORMAT_VERSION}); upgrade mlilt")
        config._check_fields(where)
        return config

    def _check_fields(self, where: str) -> None:
        """What loading relies on: readable methods and both towers named (else a PackError, not a crash)."""
        from mlilt.methods import parse_method
        for key in ("method", "image_method"):
            value = getattr(self, key)
            try:
                if not isinstance(value, str):
                    raise UsageError(f"expected a string, not {value!r}")
                parse_method(value)
            except UsageError as error:
                raise PackError(f"{where}: {key}: {error}") from error
        for side in ("text", "image"):
            tower = self.towers.get(side) if isinstance(self.towers, dict) else None
            if not isinstance(tower, dict) or not all(isinstance(tower.get(k), str) for k in ("spec", "fingerprint")):
                raise PackError(f"{where}: towers.{side} must give the {side} tower's spec and fingerprint")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass
class Pack:
    path: Path
    config: PackConfig
    tensors: dict[str, torch.Tensor]

    def side_tensors(self, side: str) -> dict[str, torch.Tensor]:
        prefix = side + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def save_pack(out: str | os.PathLike, model: ContrastiveModel, config: PackConfig, overwrite: bool = False) -> Path:
    """Write a pack folder atomically: a finished pack is replaced only by another finished one."""
    out = Path(out)
    if (out / PACK_CONFIG).exists() and not overwrite:
        raise UsageError(f"{out} already holds a pack; pass --overwrite to replace it")
    if out.exists() and not (out / PACK_CONFIG).exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a pack folder; choose another --out")
    from mlilt import __version__
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.pack_state().items()}
    config.mlilt_version = __version__
    config.created = config.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic.staged_dir(out, replace=True) as stage:
        (stage / PACK_TENSORS).write_bytes(save(tensors, metadata={"format": "pt", "language": config.language}))
        (stage / PACK_CONFIG).write_text(config.to_json(), encoding="utf-8")
    return out


def read_pack(path: str | os.PathLike) -> Pack:
    """Read and check a pack folder (or its name in an index); no model is touched."""
    folder = resolve_pack(path)
    config_file, tensor_file = folder / PACK_CONFIG, folder / PACK_TENSORS
    for needed in (config_file, tensor_file):
        if not needed.is_file():
            raise PackError(f"{folder} is not a complete pack: {needed.name} is missing")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise PackError(f"{config_file}: expected a JSON object")
    config = PackConfig.from_dict(raw, str(config_file))
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise PackError(f"{tensor_file}: unreadable or truncated safetensors file ({error})") from error
    pack = Pack(folder, config, tensors)
    _check_image_side(pack)
    return pack


def _check_image_side(pack: Pack) -> None:
    fingerprint = pack.config.towers.get("image", {}).get("fingerprint", "")
    actual = image_side_id(fingerprint, pack.side_tensors("image"))
    if actual != pack.config.image_side_id:
        raise PackError(f"{pack.path}: image-side tensors do not match the recorded image_side_id "
                        f"(file changed or corrupted)")


def check_tower(pack: Pack, side: str, fingerprint: str, spec: str) -> None:
    """Refuse a pack made for other towers, naming both."""
    expected = pack.config.towers[side]
    if expected["fingerprint"] != fingerprint:
        raise PackError(f"{pack.path}: made for {side} tower {expected['spec']!r} "
                        f"(fingerprint {expected['fingerprint'][:12]}), but the loaded {side} tower is "
                        f"{spec!r} (fingerprint {fingerprint[:12]})")


# ---- finding packs by name -------------------------------------------------------------

def pack_search_dirs() -> list[Path]:
    from mlilt.paths import cache_dir
    dirs = [Path(p) for p in os.environ.get(PACKS_ENV, "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "langpacks", cache_dir() / "packs"]


def resolve_pack(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    for folder in pack_search_dirs():
        entry = read_index(folder).get(name)
        if entry is not None:
            target = (folder / entry["path"]).resolve()
            if not target.is_relative_to(folder.resolve()):
                raise PackError(f"{folder / INDEX_FILE}: entry {name!r} points outside its folder")
            return target
    raise PackError(f"no pack {name!r}: not a folder, and not in the index of "
                    f"{', '.join(str(d) for d in pack_search_dirs())}")


def read_index(folder: Path) -> dict[str, dict]:
    index = folder / INDEX_FILE
    if not index.is_file():
        return {}
    try:
        packs = json.loads(index.read_text(encoding="utf-8")).get("packs", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise PackError(f"{index}: not a valid pack index ({error})") from error
    return {name: entry for name, entry in packs.items() if isinstance(entry, dict) and "path" in entry}


def list_packs() -> list[tuple[str, Path, dict]]:
    """(name, folder, index entry) for every indexed pack, first index wins."""
    found: dict[str, tuple[str, Path, dict]] = {}
    for folder in pack_search_dirs():
        for name, entry in read_index(folder).items():
            found.setdefault(name, (name, folder / entry["path"], entry))
    return list(found.values())
