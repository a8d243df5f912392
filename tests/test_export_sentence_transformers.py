"""``mlilt packs export --format sentence-transformers``: for every method, the exported
folder's ``SentenceTransformer.encode`` is the pack's ``encode_text``; an edited file is named
when it loads; the CLI refuses an existing --out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.errors import PackError, UsageError
from mlilt.export import export_pack
from tiny_towers import train_tiny_pack

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cnn_towers")
import sentence_transformers as st  # noqa: E402  (a declared dependency: missing is a failure)
runner = CliRunner()

# Every method the catalog has for the text side (top is a modifier: with another part).
METHODS = ["ln", "bitfit", "adapter", "ln+adapter", "lora", "ln+top:1", "unlock:1", "head", "full-text", "full"]
TEXTS = ["a red circle", "kubwa ndogo nyekundu bluu duara mraba na a large small red blue green", "star",
         "a small blue square left and top", "zzz words the tokenizer does not know", "na",
         "a large yellow triangle at the bottom right and a green star top left", ""]
MODULE = "0_MliltTextSide"


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """One tiny pack per method, trained on first use."""
    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            root = tmp_path_factory.mktemp(method.replace("+", "_").replace(":", "_"))
            made[method] = Path(train_tiny_pack(root, method=method, seed=1))
        return made[method]
    return get


def load_st(folder: Path):
    return st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def no_registry(monkeypatch):
    """Loading an export must not ask mlilt's tower registry for anything."""
    import mlilt.towers.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("the export asked the tower registry for a tower")
    monkeypatch.setattr(registry, "load_text_tower", refuse)
    monkeypatch.setattr("mlilt.modeling.factory.load_text_tower", refuse)


@pytest.mark.parametrize("method", METHODS)
def test_export_encodes_as_the_pack_does(method, packs, tmp_path, monkeypatch):
    pack = packs(method)
    expected = mlilt.load(pack).encode_text(TEXTS, lang="sw")
    out = export_pack(pack, "sentence-transformers", tmp_path / "st")
    no_registry(monkeypatch)
    model = load_st(out)
    for batch_size in (32, 3):  # other batches pad differently: still the same embeddings
        got = torch.from_numpy(model.encode(TEXTS, batch_size=batch_size))
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=0), method
    assert model.get_embedding_dimension() == 16
    one = torch.from_numpy(model.encode("a red circle"))
    assert torch.allclose(one, expected[0], atol=1e-5, rtol=0)


def test_export_layout_and_records(packs, tmp_path):
    pack = packs("ln+adapter")
    out = export_pack(pack, "sentence-transformers", tmp_path / "st")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["mlilt.export.st_module.MliltTextSide"]
    assert modules[0]["path"] == MODULE
    record = json.loads((out / MODULE / "mlilt_text_side.json").read_text())
    config = json.loads((pack / "langpack.json").read_text())
    assert record["method"] == "ln+adapter" and record["language"] == "sw"
    assert record["tensors_sha256"] == config["tensors_sha256"]
    assert record["text_tower"]["fingerprint"] == config["towers"]["text"]["fingerprint"]
    assert {"pack/langpack.json", "pack/langpack.safetensors", "tower/model.safetensors",
            "tower/config.json"} <= set(record["files"])
    assert (out / MODULE / "pack" / "langpack.safetensors").read_bytes() == (pack / "langpack.safetensors").read_bytes()
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {} and st_config["default_prompt_name"] is None
    mlilt.load(out / MODULE / "pack")  # the copied pack is still a pack


def test_sentence_transformers_asks_trust_for_the_mlilt_module(packs, tmp_path):
    # sentence-transformers 6 imports no module class outside its own package without the flag.
    out = export_pack(packs("ln"), "sentence-transformers", tmp_path / "st")
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(out), device="cpu")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit, name", [
    (lambda d: _flip_last_byte(d / "tower" / "model.safetensors"), "tower/model.safetensors"),
    (lambda d: (d / "tower" / "config.json").write_text(
        (d / "tower" / "config.json").read_text().replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-05')),
     "tower/config.json"),
    (lambda d: _flip_last_byte(d / "pack" / "langpack.safetensors"), "pack/langpack.safetensors"),
    (lambda d: (d / "pack" / "langpack.json").write_text(
        (d / "pack" / "langpack.json").read_text().replace('"sw"', '"sv"')), "pack/langpack.json"),
    (lambda d: (d / "tower" / "tokenizer.json").unlink(), "tower/tokenizer.json"),
    (lambda d: (d / "tower" / "special_tokens_map.json").write_text("{}"), "tower/special_tokens_map.json"),
])
def test_hand_edited_export_is_refused_naming_the_file(edit, name, packs, tmp_path):
    out = export_pack(packs("ln+adapter"), "sentence-transformers", tmp_path / "st")
    before = (out / MODULE / name).read_bytes() if (out / MODULE / name).exists() else None
    edit(out / MODULE)
    after = (out / MODULE / name).read_bytes() if (out / MODULE / name).exists() else None
    assert after != before  # the edit took
    with pytest.raises(PackError, match=name.replace("/", "[/\\\\]")):
        load_st(out)


def test_edited_record_still_refused_by_the_pack_checks(packs, tmp_path):
    """Editing the manifest to match an edited tensor file: the pack's own sha256 still refuses it."""
    from mlilt.export.st_module import file_sha256

    out = export_pack(packs("ln+adapter"), "sentence-transformers", tmp_path / "st")
    folder = out / MODULE
    _flip_last_byte(folder / "pack" / "langpack.safetensors")
    record = json.loads((folder / "mlilt_text_side.json").read_text())
    record["files"]["pack/langpack.safetensors"] = file_sha256(folder / "pack" / "langpack.safetensors")
    (folder / "mlilt_text_side.json").write_text(json.dumps(record))
    with pytest.raises(PackError, match="langpack.safetensors"):
        load_st(out)


def test_export_refuses_existing_out_and_replaces_with_overwrite(packs, tmp_path):
    out = export_pack(packs("ln"), "sentence-transformers", tmp_path / "st")
    with pytest.raises(UsageError, match="--overwrite"):
        export_pack(packs("ln"), "sentence-transformers", out)
    export_pack(packs("bitfit"), "sentence-transformers", out, overwrite=True)
    assert json.loads((out / MODULE / "mlilt_text_side.json").read_text())["method"] == "bitfit"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a sentence-transformers folder"):
        export_pack(packs("ln"), "sentence-transformers", other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="unknown export format"):
        export_pack(packs("ln"), "onnx", tmp_path / "x")


def test_cli_export_end_to_end(packs, tmp_path):
    pack, out = packs("ln+adapter"), tmp_path / "cli-st"
    args = ["packs", "export", str(pack), "--format", "sentence-transformers", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exported" in result.output and "trust_remote_code=True" in result.output
    expected = mlilt.load(pack).encode_text(TEXTS, lang="sw")
    assert torch.allclose(torch.from_numpy(load_st(out).encode(TEXTS)), expected, atol=1e-5, rtol=0)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    wrong = runner.invoke(app, ["packs", "export", str(pack), "--format", "onnx", "--out", str(tmp_path / "y")])
    assert wrong.exit_code != 0


def test_the_peft_format_refuses_a_pack_without_lora_pointing_to_this_one(packs, tmp_path):
    with pytest.raises(UsageError, match="sentence-transformers"):
        export_pack(packs("ln"), "peft", tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_default_me5_pack_exports_and_matches(tmp_path):
    pack = Path(__file__).resolve().parents[1] / "langpacks" / "sw"
    texts = ["mbwa mweusi anakimbia kwenye nyasi", "watoto wawili wanacheza mpira ufukweni",
             "a red bus on a city street", "gari"]
    expected = mlilt.load(pack).encode_text(texts, lang="sw")
    out = export_pack(pack, "sentence-transformers", tmp_path / "sw-st")
    got = torch.from_numpy(load_st(out).encode(texts, batch_size=2))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
