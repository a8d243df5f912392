"""Language packs: ``langpack.json`` (what, for which towers, how trained, how good) and
``langpack.safetensors`` (the trained tensors only). Loaded from JSON + safetensors only —
never pickle — and checked against the towers before any tensor touches a model.

``langpack.json`` records the sha256 of ``langpack.safetensors`` (``tensors_sha256``) and
its tensors' dtypes and shapes (``tensor_layout``): a changed byte is refused when read
(text-side values have no other check). The tensor file is written with a sorted header,
so the same tensors always give the same bytes."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mlilt.files import atomic
from mlilt.errors import PackError, UsageError

if TYPE_CHECKING:  # packs sit below modeling: the model is only passed in
    from mlilt.modeling.model import ContrastiveModel

PACK_CONFIG = "langpack.json"
PACK_TENSORS = "langpack.safetensors"
FORMAT_VERSION = 1
PACKS_ENV = "MLILT_PACKS"
INDEX_FILE = "index.json"


def side_id(tower_fingerprint: str, tensors: dict[str, torch.Tensor]) -> str:
    """Identity of one side's embedding space: its tower plus every tensor of that side (for the
    image side, ``image_side_id``: packs with the same one share an image space)."""
    digest = hashlib.sha256(tower_fingerprint.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()



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
    # sha256 of langpack.safetensors' bytes, and each tensor's [dtype, shape] when saved: a
    # changed byte anywhere in the tensors is a PackError (older packs lack both: a warning)
    tensors_sha256: str | None = None
    tensor_layout: dict | None = None

    @classmethod
    def for_model(cls, model: ContrastiveModel, language: str, method: str, image_method: str | None = None,
                  **rest) -> "PackConfig":
        """The config of ``model``'s pack: its towers, their fingerprints and its image space."""
        text = model.text.tower
        image_tensors = {k[len("image."):]: v for k, v in model.pack_state().items() if k.startswith("image.")}
        towers = {"text": {"spec": text.spec, "fingerprint": model.text.base_fingerprint,
                           "options": {"pooling": text.pooling, "max_length": text.max_length, "prefix": text.prefix}},
                  "image": {"spec": model.image.tower.spec, "fingerprint": model.image.base_fingerprint,
                            "options": {}}}
        return cls(language=language, method=method, image_method=image_method or method,
                   embed_dim=model.text.proj.out_features, towers=towers,
                   image_side_id=side_id(model.image.base_fingerprint, image_tensors), **rest)

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
        if (not isinstance(config.format_version, int) or isinstance(config.format_version, bool)
                or config.format_version > FORMAT_VERSION):
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
            if not isinstance(tower.get("options", {}), dict):
                raise PackError(f"{where}: towers.{side}.options must be an object")
        _check_text_options(self.towers["text"].get("options", {}), where)
        expected = {"language": str, "image_side_id": str, "mlilt_version": str, "created": str,
                    "data": dict, "metrics": dict, "training": dict, "trainable": dict}
        for key, kind in expected.items():
            if not isinstance(getattr(self, key), kind):
                raise PackError(f"{where}: {key} must be a {_JSON_NAMES[kind]}, not {getattr(self, key)!r:.60}")
        if not self.language:
            raise PackError(f"{where}: language must not be empty")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or not 0 < self.embed_dim <= 1 << 16:
            raise PackError(f"{where}: embed_dim must be a positive integer, not {self.embed_dim!r:.60}")
        if self.anchor is not None and not (isinstance(self.anchor, dict) and isinstance(self.anchor.get("name"), str)
                                            and isinstance(self.anchor.get("image_side_id"), str)):
            raise PackError(f"{where}: anchor must be null or give the anchor's name and image_side_id")
        if self.tensors_sha256 is not None and not (isinstance(self.tensors_sha256, str)
                                                    and _HEX64.fullmatch(self.tensors_sha256)):
            raise PackError(f"{where}: tensors_sha256 must be a sha256 hex digest")
        if self.tensor_layout is not None and not _valid_layout(self.tensor_layout):
            raise PackError(f"{where}: tensor_layout must map tensor names to [dtype, shape]")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_JSON_NAMES = {str: "string", dict: "JSON object"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT_OPTIONS = {"pooling": (str, type(None)), "max_length": (int,), "prefix": (str, type(None))}


def _check_text_options(options: dict, where: str) -> None:
    """The text tower's options become keyword arguments of load_text_tower: only known ones."""
    for key, value in options.items():
        kinds = _TEXT_OPTIONS.get(key)
        if kinds is None or isinstance(value, bool) or not isinstance(value, kinds) or (key == "max_length"
                                                                                          and value <= 0):
            raise PackError(f"{where}: towers.text.options: bad option {key!r}: {value!r:.60}")


def _valid_layout(layout) -> bool:
    return isinstance(layout, dict) and all(
        isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in entry[1]) for entry in layout.values())


def tensor_layout(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{name: [dtype, shape]}: what the tensors are, without their values."""
    return {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in sorted(tensors.items())}


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that depend on the tensors and metadata only.

    The safetensors writer emits its metadata map in hash order, which changes from one
    process to the next; the header is rewritten here with sorted keys (same length, same
    offsets) so that equal tensors always give equal bytes.
    """
    data = save({k: tensors[k] for k in sorted(tensors)}, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # never expected: the writer's own JSON is compact too
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length:]


@dataclass
class Pack:
    path: Path
    config: PackConfig
    tensors: dict[str, torch.Tensor]

    def side_tensors(self, side: str) -> dict[str, torch.Tensor]:
        prefix = side + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def check_pack_destination(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse ``out`` as a pack folder: another pack there (unless ``overwrite``), or a folder of other files."""
    out = Path(out)
    if (out / PACK_CONFIG).exists() and not overwrite:
        raise UsageError(f"{out} already holds a pack; pass --overwrite to replace it")
    if out.exists() and not (out / PACK_CONFIG).exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a pack folder; choose another --out")


def save_pack(out: str | os.PathLike, model: ContrastiveModel, config: PackConfig, overwrite: bool = False) -> Path:
    """Write a pack folder atomically: a finished pack is replaced only by another finished one."""
    out = Path(out)
    check_pack_destination(out, overwrite)
    from mlilt import __version__
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.pack_state().items()}
    config.mlilt_version = __version__
    config.created = config.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data = serialize_tensors(tensors, {"format": "pt", "language": config.language})
    config.tensors_sha256 = hashlib.sha256(data).hexdigest()
    config.tensor_layout = tensor_layout(tensors)
    with atomic.staged_dir(out, replace=True) as stage:
        (stage / PACK_TENSORS).write_bytes(data)
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
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as error:  # ValueError: JSONDecodeError
        raise PackError(f"{config_file}: not valid JSON ({type(error).__name__}: {error})") from error
    if not isinstance(raw, dict):
        raise PackError(f"{config_file}: expected a JSON object")
    config = PackConfig.from_dict(raw, str(config_file))
    try:
        data = tensor_file.read_bytes()
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise PackError(f"{tensor_file}: unreadable or truncated safetensors file ({error})") from error
    except Exception as error:  # the reader's own checks may surface as other errors
        raise PackError(f"{tensor_file}: unreadable or truncated safetensors file "
                        f"({type(error).__name__}: {error})") from error
    pack = Pack(folder, config, tensors)
    _check_image_side(pack)
    _check_checksum(pack, data, tensor_file)
    return pack


def _check_checksum(pack: Pack, data: bytes, tensor_file: Path) -> None:
    """A changed byte in the tensors is an error; a changed layout of the text or image side is
    left to the strict load (its message names the tensor), anything else is an error here."""
    config = pack.config
    if config.tensors_sha256 is None:
        warnings.warn(f"{tensor_file}: no tensors_sha256 recorded (a pack from an older mlilt): "
                      f"damage to its tensor values cannot be detected", stacklevel=3)
        return
    if hashlib.sha256(data).hexdigest() == config.tensors_sha256:
        return
    recorded, actual = config.tensor_layout, tensor_layout(pack.tensors)
    if recorded is not None and recorded != actual:
        changed = {n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n)}
        if changed and all(n.startswith(("text.", "image.")) for n in changed):
            return  # the strict load refuses these tensors by name
    raise PackError(f"{tensor_file}: checksum mismatch: the file's sha256 is not the tensors_sha256 recorded "
                    f"in {PACK_CONFIG} (file changed or corrupted)")


def _check_image_side(pack: Pack) -> None:
    fingerprint = pack.config.towers.get("image", {}).get("fingerprint", "")
    actual = side_id(fingerprint, pack.side_tensors("image"))
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
    from mlilt.files.paths import cache_dir
    dirs = [Path(p) for p in os.environ.get(PACKS_ENV, "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "langpacks", cache_dir() / "packs"]


def resolve_pack(name_or_path: str | os.PathLike) -> Path:
    if isinstance(name_or_path, str) and name_or_path.startswith("hf://"):  # hf://user/repo[@revision]
        from mlilt.hub import resolve_hub_pack
        return resolve_hub_pack(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    for folder in pack_search_dirs():
        entry = read_index(folder).get(name)
        if entry is not None:
            return _entry_folder(folder, name, entry)
    raise PackError(f"no pack {name!r}: not a folder, and not in the index of "
                    f"{', '.join(str(d) for d in pack_search_dirs())}")


def read_index(folder: Path) -> dict[str, dict]:
    index = folder / INDEX_FILE
    if not index.is_file():
        return {}
    try:
        packs = json.loads(index.read_text(encoding="utf-8")).get("packs", {})
        if not isinstance(packs, dict):
            raise ValueError("'packs' is not an object")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError, OSError) as error:
        raise PackError(f"{index}: not a valid pack index ({error})") from error
    return packs


def _entry_folder(folder: Path, name: str, entry) -> Path:
    """The pack folder an index entry names, which must lie inside the index's folder."""
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
        raise PackError(f"{folder / INDEX_FILE}: entry {name!r} must be an object with a \"path\" string")
    target = (folder / entry["path"]).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise PackError(f"{folder / INDEX_FILE}: entry {name!r} points outside its folder")
    return target


def list_packs() -> list[tuple[str, Path, dict]]:
    """(name, folder, index entry) for every indexed pack, first index wins."""
    found: dict[str, tuple[str, Path, dict]] = {}
    for folder in pack_search_dirs():
        for name, entry in read_index(folder).items():
            found.setdefault(name, (name, _entry_folder(folder, name, entry), entry))
    return list(found.values())
