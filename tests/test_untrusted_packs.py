"""Packs from strangers: whatever the bytes of a pack folder, reading or loading it raises a
PackError (or a TowerLoadError when it names a tower that cannot be loaded) — never another
exception — and a model that does load holds exactly the pack's tensors.

A real pack (random method tensors on the tiny towers) is written once per module with
``save_pack``; each hypothesis example damages a fresh copy of it: truncation, bit flips in
either file, random JSON or bytes in place of the config, changed config values. The source
scan at the end keeps pickle-loading and remote code out of mlilt.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mlilt
from mlilt.modeling.factory import build_sides
from mlilt.errors import PackError
from mlilt.modeling.model import ContrastiveModel
from mlilt.packs import (FORMAT_VERSION, INDEX_FILE, PACK_CONFIG, PACK_TENSORS, PackConfig, read_pack, side_id,
                         save_pack)
from mlilt.errors import TowerLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_SPEC, IMAGE_SPEC = "tiny-bert-0", "tiny-timm-vit"
EMBED_DIM = 16
METHOD = "ln+adapter"
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REFUSED = (PackError, TowerLoadError)
CAPTIONS = ["a large red circle", "duara nyekundu kubwa", "triangle"]


# --------------------------------------------------------------------------- one real pack


@pytest.fixture(scope="module")
def towers(tiny_vit_towers):
    return tiny_vit_towers


@pytest.fixture(scope="module")
def pack(towers, tmp_path_factory) -> Path:
    """A pack whose method tensors are random (not the identity): wrong tensors would show."""
    sides, _ = build_sides(towers, METHOD, EMBED_DIM, seed=5)
    model = ContrastiveModel(sides["text"], sides["image"])
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.pack_state().items():
            param.copy_(param + 0.3 * torch.randn(param.shape, generator=generator))
    config = PackConfig.for_model(model, "sw", METHOD, metrics={"val": {"mean_recall": 12.5}},
                                  data={"rows": 10, "sha256": "0" * 64})
    return save_pack(tmp_path_factory.mktemp("untrusted") / "sw", model, config)


@pytest.fixture(scope="module")
def expected(pack):
    """What a correct load holds: the pack's tensors per side, and its logit scale."""
    model = mlilt.load(pack)
    tensors = read_pack(pack).tensors
    return {"image": {k: v.clone() for k, v in model.image.own_state().items()},
            "text": {k: v.clone() for k, v in model.texts["sw"].own_state().items()},
            "scale": model.logit_scale, "tensors": tensors}


@contextlib.contextmanager
def _copy(pack: Path):
    with tempfile.TemporaryDirectory(prefix="untrusted-") as tmp:
        yield Path(shutil.copytree(pack, Path(tmp) / "p"))


def _load_or_refuse(folder: Path, expected) -> str:
    """'refused' or 'loaded'; any other exception fails the test, and so does a model whose
    tensors are not the pack's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys, missing checksum: warnings, not errors
        try:
            read_pack(folder)
            read_ok = True
        except PackError:
            read_ok = False
        try:
            model = mlilt.load(folder)
            model.image  # the image side is built on first use: build it now
        except REFUSED:
            return "refused"
    assert read_ok, "mlilt.load accepted a pack that read_pack refused"
    _assert_same_tensors(model, expected)
    return "loaded"


def _assert_same_tensors(model, expected) -> None:
    (lang,) = model.languages
    for side, encoder in (("image", model.image), ("text", model.texts[lang])):
        own = encoder.own_state()
        assert own.keys() == expected[side].keys()
        for name, value in own.items():
            assert value.dtype == expected[side][name].dtype and torch.equal(value, expected[side][name]), \
                f"loaded a model with a wrong {side} tensor {name}"
    assert model.logit_scale == expected["scale"]


def _copied(pack: Path, tmp_path: Path) -> Path:
    """A copy of the pack in the test's own folder, to damage."""
    return Path(shutil.copytree(pack, tmp_path / "p"))


def _edit_config(folder: Path, change) -> None:
    raw = json.loads((folder / PACK_CONFIG).read_text(encoding="utf-8"))
    change(raw)
    (folder / PACK_CONFIG).write_text(json.dumps(raw), encoding="utf-8")


def _rewrite_tensors(folder: Path, change, fix_image_side_id: bool = False) -> None:
    """Rewrite the pack's tensors with ``change(tensors)`` applied; optionally record the new
    image_side_id so the damage gets past the image-side check."""
    tensors = load_file(str(folder / PACK_TENSORS))
    change(tensors)
    save_file(tensors, str(folder / PACK_TENSORS))
    if fix_image_side_id:
        image = {k[len("image."):]: v for k, v in tensors.items() if k.startswith("image.")}
        _edit_config(folder, lambda raw: raw.update(
            image_side_id=side_id(raw["towers"]["image"]["fingerprint"], image)))


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


# --------------------------------------------------------------------------- the pristine pack


def test_pristine_pack_loads_and_records_its_checksum(pack, expected):
    raw = json.loads((pack / PACK_CONFIG).read_text(encoding="utf-8"))
    assert raw["tensors_sha256"] == hashlib.sha256((pack / PACK_TENSORS).read_bytes()).hexdigest()
    assert set(raw["tensor_layout"]) == set(expected["tensors"])
    assert raw["tensor_layout"]["text.proj.weight"] == ["float32", [EMBED_DIM, 32]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_or_refuse(pack, expected) == "loaded"


# --------------------------------------------------------------------------- damaged bytes


@FUZZ
@given(which=st.sampled_from([PACK_CONFIG, PACK_TENSORS]), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(pack, expected, which, fraction):
    with _copy(pack) as folder:
        data = (folder / which).read_bytes()
        (folder / which).write_bytes(data[:int(len(data) * fraction)])
        assert _load_or_refuse(folder, expected) == "refused"


@FUZZ
@given(bits=st.lists(st.integers(min_value=0), min_size=1, max_size=3), header=st.booleans())
def test_bit_flips_in_the_tensor_file_are_refused(pack, expected, bits, header):
    """Every changed byte of langpack.safetensors is caught: in the header by the reader or
    the checksum, in the data by the image_side_id (image side) or the checksum (the rest)."""
    with _copy(pack) as folder:
        data = (folder / PACK_TENSORS).read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little")
        for bit in bits:  # half the examples aim at the header, where the structure is
            bit = bit % (header_end * 8) if header else bit
            data = _flip(data, bit)
        if data == (pack / PACK_TENSORS).read_bytes():
            return  # flips that cancel out
        (folder / PACK_TENSORS).write_bytes(data)
        assert _load_or_refuse(folder, expected) == "refused"


def test_a_flip_in_text_data_is_a_checksum_mismatch(pack, expected, tmp_path):
    """Text-side values have no other check: only the checksum stands between a flipped bit
    and a model that silently encodes differently."""
    folder = _copied(pack, tmp_path)
    data = (folder / PACK_TENSORS).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    start, _ = header["text.proj.weight"]["data_offsets"]
    (folder / PACK_TENSORS).write_bytes(_flip(data, (8 + header_length + start + 5) * 8 + 3))
    with pytest.raises(PackError, match="checksum mismatch"):
        read_pack(folder)
    with pytest.raises(PackError, match="checksum mismatch"):
        mlilt.load(folder)


@FUZZ
@given(bits=st.lists(st.integers(min_value=0), min_size=1, max_size=3))
def test_bit_flips_in_the_config(pack, expected, bits):
    """A flipped bit in langpack.json may leave a loadable pack (a changed metric, a renamed
    optional key), but never one that loads other tensors."""
    with _copy(pack) as folder:
        data = (folder / PACK_CONFIG).read_bytes()
        for bit in bits:
            data = _flip(data, bit)
        (folder / PACK_CONFIG).write_bytes(data)
        _load_or_refuse(folder, expected)


@FUZZ
@given(which=st.sampled_from([PACK_CONFIG, PACK_TENSORS]), data=st.binary(max_size=256))
def test_random_bytes_are_refused(pack, expected, which, data):
    with _copy(pack) as folder:
        (folder / which).write_bytes(data)
        assert _load_or_refuse(folder, expected) == "refused"


# --------------------------------------------------------------------------- hostile JSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


@FUZZ
@given(value=JSON)
def test_random_json_config_is_refused(pack, expected, value):
    with _copy(pack) as folder:
        (folder / PACK_CONFIG).write_text(json.dumps(value), encoding="utf-8")
        assert _load_or_refuse(folder, expected) == "refused"


def _paths(raw, prefix=()):
    """Every key path of a JSON document."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


@FUZZ
@given(data=st.data())
def test_config_values_replaced_by_random_json(pack, expected, data):
    """Keep the config's shape, replace one to three values anywhere in it (or drop them)."""
    raw = json.loads((pack / PACK_CONFIG).read_text(encoding="utf-8"))
    paths = sorted(_paths(raw))
    changed = copy.deepcopy(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = changed
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(JSON)
        else:
            parent.pop(path[-1], None)
    with _copy(pack) as folder:
        (folder / PACK_CONFIG).write_text(json.dumps(changed), encoding="utf-8")
        _load_or_refuse(folder, expected)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"language": ' + "9" * 10_000 + "}", "\ud800"],
                         ids=["deep-nesting", "huge-integer", "lone-surrogate"])
def test_pathological_json_is_a_pack_error(pack, tmp_path, text):
    folder = _copied(pack, tmp_path)
    (folder / PACK_CONFIG).write_bytes(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(PackError, match=re.escape(PACK_CONFIG)):
        read_pack(folder)


# --------------------------------------------------------------------------- named errors


@pytest.mark.parametrize("keep", [0, 4, 9, 0.5, -1])
def test_truncated_tensor_file(pack, tmp_path, keep):
    pack = _copied(pack, tmp_path)
    data = (pack / PACK_TENSORS).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    (pack / PACK_TENSORS).write_bytes(data[:cut])
    with pytest.raises(PackError, match="unreadable or truncated safetensors"):
        mlilt.load(pack)


def test_tensor_file_with_a_broken_header(pack, tmp_path):
    pack = _copied(pack, tmp_path)
    data = bytearray((pack / PACK_TENSORS).read_bytes())
    data[8:9] = b"["  # the header's JSON, broken in place: the length still matches
    (pack / PACK_TENSORS).write_bytes(bytes(data))
    with pytest.raises(PackError, match="unreadable or truncated safetensors"):
        mlilt.load(pack)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"'])
def test_config_that_is_not_a_json_object(pack, tmp_path, content):
    pack = _copied(pack, tmp_path)
    (pack / PACK_CONFIG).write_bytes(content)
    with pytest.raises(PackError, match=re.escape(PACK_CONFIG)):
        mlilt.load(pack)


@pytest.mark.parametrize("missing", [PACK_CONFIG, PACK_TENSORS])
def test_missing_file_is_named(pack, tmp_path, missing):
    pack = _copied(pack, tmp_path)
    (pack / missing).unlink()
    with pytest.raises(PackError, match=f"not a complete pack: {re.escape(missing)} is missing"):
        mlilt.load(pack)


def test_missing_folder(tmp_path):
    with pytest.raises(PackError, match="no pack"):
        mlilt.load(tmp_path / "nowhere")


def test_missing_required_key(pack, tmp_path):
    pack = _copied(pack, tmp_path)
    _edit_config(pack, lambda raw: raw.pop("image_side_id"))
    with pytest.raises(PackError, match="missing keys.*image_side_id"):
        mlilt.load(pack)


def test_unknown_config_key_loads_with_a_warning(pack, tmp_path):
    original, pack = pack, _copied(pack, tmp_path)
    _edit_config(pack, lambda raw: raw.update(from_the_future={"x": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = mlilt.load(pack)
    assert torch.equal(loaded.encode_text(CAPTIONS, lang="sw"), mlilt.load(original).encode_text(CAPTIONS, lang="sw"))


def test_known_keys_load_without_warnings(pack):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlilt.load(pack)


@pytest.mark.parametrize("key, value, words", [
    ("method", "bogus", "unknown method 'bogus'"),
    ("method", 5, "expected a string"),
    ("image_method", "ln+ln", "listed twice"),
    ("towers", {"image": {"spec": "x", "fingerprint": "y"}}, "towers.text"),
    ("towers", [], "towers.text"),
    ("towers", "DROP-IMAGE-FINGERPRINT", "towers.image"),
])
def test_config_fields_that_loading_relies_on(pack, tmp_path, key, value, words):
    """A malformed pack is a PackError naming the file, never a UsageError or a KeyError."""
    pack = _copied(pack, tmp_path)

    def change(raw):
        if value == "DROP-IMAGE-FINGERPRINT":
            del raw["towers"]["image"]["fingerprint"]
        else:
            raw[key] = value

    _edit_config(pack, change)
    with pytest.raises(PackError) as error:
        mlilt.load(pack)
    assert PACK_CONFIG in str(error.value) and key in str(error.value) and words in str(error.value)


def test_method_that_does_not_match_the_tensors(pack, tmp_path):
    pack = _copied(pack, tmp_path)
    _edit_config(pack, lambda raw: raw.update(method="lora"))  # the tensors are ln+adapter's
    expected = r"\(text side\): tensors do not match.*missing: .*lora_A.*unexpected: .*adapter"
    with pytest.raises(PackError, match=expected):
        mlilt.load(pack)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "1", None])
def test_newer_or_odd_format_version(pack, tmp_path, version):
    pack = _copied(pack, tmp_path)
    _edit_config(pack, lambda raw: raw.update(format_version=version))
    with pytest.raises(PackError, match="format version"):
        mlilt.load(pack)


def test_changed_image_tensor_breaks_image_side_id(pack, tmp_path):
    pack = _copied(pack, tmp_path)

    def nudge(tensors):
        name = next(k for k in sorted(tensors) if k.startswith("image.") and "adapter" in k)
        tensors[name] = tensors[name] + 1e-3

    _rewrite_tensors(pack, nudge)
    with pytest.raises(PackError, match="image_side_id"):
        read_pack(pack)
    with pytest.raises(PackError, match="image_side_id"):
        mlilt.load(pack)


def _reshape(name):
    def change(tensors):
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    return change


def _retype(name):
    def change(tensors):
        tensors[name] = tensors[name].double()
    return change


def _add(name):
    def change(tensors):
        tensors[name] = torch.zeros(3)
    return change


def _drop(name):
    def change(tensors):
        del tensors[name]
    return change


TEXT_ADAPTER = "text.tower.model.encoder.layer.1.output.dense.adapter.down.weight"
IMAGE_ADAPTER = "image.tower.model.blocks.0.mlp.fc2.adapter.up.weight"


@pytest.mark.parametrize("change, tensor, words", [
    (_reshape("text.proj.weight"), "proj.weight", "expected torch.float32 (16, 32)"),
    (_retype("text.proj.weight"), "proj.weight", "torch.float64"),
    (_reshape(TEXT_ADAPTER), TEXT_ADAPTER[len("text."):], "(text side)"),
    (_add("text.tower.extra.weight"), "tower.extra.weight", "unexpected"),
    (_drop(TEXT_ADAPTER), TEXT_ADAPTER[len("text."):], "missing"),
    (_reshape("image.proj.weight"), "proj.weight", "(image side)"),
    (_retype(IMAGE_ADAPTER), IMAGE_ADAPTER[len("image."):], "(image side)"),
    (_add("image.tower.extra"), "tower.extra", "unexpected"),
    (_drop(IMAGE_ADAPTER), IMAGE_ADAPTER[len("image."):], "missing"),
], ids=["text-shape", "text-dtype", "text-adapter-shape", "text-extra", "text-missing", "image-shape",
        "image-dtype", "image-extra", "image-missing"])
def test_tensor_mismatch_names_the_tensor(pack, tmp_path, change, tensor, words):
    pack = _copied(pack, tmp_path)
    _rewrite_tensors(pack, change, fix_image_side_id=True)
    read_pack(pack)  # the image-side check passes: the damage reaches the strict load
    with pytest.raises(PackError) as error:
        mlilt.load(pack).image  # the text sides are built by load(), the image side on first use
    assert tensor in str(error.value) and words in str(error.value)


# --------------------------------------------------------------------------- the checksum


def test_changed_checksum_is_refused(pack, tmp_path):
    folder = _copied(pack, tmp_path)
    raw = json.loads((folder / PACK_CONFIG).read_text(encoding="utf-8"))
    raw["tensors_sha256"] = "0" * 64
    (folder / PACK_CONFIG).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(PackError, match="checksum mismatch"):
        read_pack(folder)


@pytest.mark.parametrize("change", [
    lambda t: t.update(logit_scale=t["logit_scale"] + 1),  # a value the strict load never sees
    lambda t: t.update(logit_scale=t["logit_scale"].double()),
    lambda t: t.update(extra=torch.zeros(2)),  # outside both sides
    lambda t: t.pop("logit_scale"),
], ids=["logit-scale-value", "logit-scale-dtype", "extra-tensor", "no-logit-scale"])
def test_changes_outside_the_sides_are_checksum_mismatches(pack, tmp_path, change):
    folder = _copied(pack, tmp_path)
    _rewrite_tensors(folder, change)
    with pytest.raises(PackError, match="checksum mismatch"):
        mlilt.load(folder)


def test_changed_side_layout_is_left_to_the_strict_load(pack, tmp_path):
    """A reshaped text tensor: the checksum defers to the strict load, whose message names it."""
    folder = _copied(pack, tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"text.proj.weight": torch.zeros(EMBED_DIM, 33)}))
    read_pack(folder)
    with pytest.raises(PackError, match=r"text\.proj\.weight|proj\.weight.*expected torch\.float32"):
        mlilt.load(folder)


@pytest.mark.parametrize("value", ["abc", 5, ["0" * 64], "G" * 64])
def test_malformed_checksum_is_refused(pack, tmp_path, value):
    folder = _copied(pack, tmp_path)
    raw = json.loads((folder / PACK_CONFIG).read_text(encoding="utf-8"))
    raw["tensors_sha256"] = value
    (folder / PACK_CONFIG).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(PackError, match="tensors_sha256"):
        read_pack(folder)


def test_pack_without_a_checksum_loads_with_a_warning(pack, expected, tmp_path):
    """Packs written before the checksum existed still load, and say what cannot be checked."""
    folder = _copied(pack, tmp_path)
    raw = json.loads((folder / PACK_CONFIG).read_text(encoding="utf-8"))
    del raw["tensors_sha256"], raw["tensor_layout"]
    (folder / PACK_CONFIG).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.warns(UserWarning, match="no tensors_sha256"):
        model = mlilt.load(folder)
    _assert_same_tensors(model, expected)


# --------------------------------------------------------------------------- index entries


def test_index_entry_that_is_a_symlink_out_of_its_folder_is_refused(pack, tmp_path, monkeypatch):
    outside = Path(shutil.copytree(pack, tmp_path / "outside"))  # a valid pack: only the check refuses it
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "sw").symlink_to(outside, target_is_directory=True)
    (packs / INDEX_FILE).write_text(json.dumps({"packs": {"sw": {"path": "sw", "language": "sw"}}}))
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackError, match="points outside its folder"):
        mlilt.load("sw")


def test_symlinks_that_stay_inside_are_fine(pack, expected, tmp_path, monkeypatch):
    real = tmp_path / "real-packs"
    Path(shutil.copytree(pack, real / "v1" / "sw"))
    (real / "sw").symlink_to(real / "v1" / "sw", target_is_directory=True)  # a "current" link
    (real / INDEX_FILE).write_text(json.dumps({"packs": {"sw": {"path": "sw", "language": "sw"}}}))
    linked = tmp_path / "packs"
    linked.symlink_to(real, target_is_directory=True)  # $MLILT_PACKS itself may be a link
    monkeypatch.setenv("MLILT_PACKS", str(linked))
    monkeypatch.chdir(tmp_path)
    _assert_same_tensors(mlilt.load("sw"), expected)


@pytest.mark.parametrize("target", ["../x", "sw/../../x", "ABSOLUTE"])
def test_index_entry_outside_its_folder_is_refused(pack, tmp_path, monkeypatch, target):
    outside = Path(shutil.copytree(pack, tmp_path / "x"))  # a valid pack: only the check can refuse it
    packs = tmp_path / "packs"
    packs.mkdir()
    entry = {"path": str(outside) if target == "ABSOLUTE" else target, "language": "sw"}
    (packs / INDEX_FILE).write_text(json.dumps({"packs": {"sw": entry}}))
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackError, match="points outside its folder"):
        mlilt.load("sw")


@pytest.mark.parametrize("text", ["{broken", *(json.dumps(index) for index in
                                                ({"packs": []}, {"packs": {"sw": {"path": 5}}}, {"packs": {"sw": "sw"}}, []))])
def test_malformed_index_is_a_pack_error(tmp_path, monkeypatch, text):
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / INDEX_FILE).write_text(text)
    monkeypatch.setenv("MLILT_PACKS", str(packs))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackError, match="pack index|index.json"):
        mlilt.load("sw")


# --------------------------------------------------------------------------- the code base


SOURCES = sorted((Path(mlilt.__file__).parent).rglob("*.py"))


def _calls(tree):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_are_scanned():
    names = {p.relative_to(Path(mlilt.__file__).parent).as_posix() for p in SOURCES}
    assert {"packs.py", "api.py", "towers/registry.py", "towers/offline.py"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.relative_to(Path(mlilt.__file__).parent).as_posix())
def test_no_pickle_loading_and_no_remote_code(source):
    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "cPickle", "dill", "joblib"} & set(modules), f"{source}:{node.lineno}: pickle"
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in [a.name for a in node.names], f"{source}:{node.lineno}: from torch import load"
    for call in _calls(tree):
        where = f"{source}:{call.lineno}"
        name = _name(call.func)
        if name in ("torch.load", "th.load"):
            value = _keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, \
                f"{where}: torch.load without weights_only=True"
        remote = _keyword(call, "trust_remote_code")
        assert remote is None or (isinstance(remote, ast.Constant) and remote.value is False), \
            f"{where}: trust_remote_code must be absent or literally False"
        pickled = _keyword(call, "allow_pickle")
        assert pickled is None or (isinstance(pickled, ast.Constant) and pickled.value is False), \
            f"{where}: allow_pickle must be absent or literally False"
        assert not any(k.arg is None for k in call.keywords if name.endswith(("from_pretrained", "torch.load"))), \
            f"{where}: **kwargs could carry trust_remote_code or weights_only=False"


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    for text in ["import torch\ntorch.load('x')\n", "import torch\ntorch.load('x', weights_only=False)\n",
                 "f(trust_remote_code=True)\n", "f(trust_remote_code=flag)\n", "import pickle\n",
                 "np.load(p, allow_pickle=True)\n"]:
        bad.write_text(text)
        with pytest.raises(AssertionError):
            test_no_pickle_loading_and_no_remote_code(bad)
    bad.write_text("import torch\ntorch.load('x', weights_only=True)\nf(trust_remote_code=False)\n")
    test_no_pickle_loading_and_no_remote_code(bad)
