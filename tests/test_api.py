"""The Python API and the packs/towers commands on a small real pack (tiny towers)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.errors import UsageError
from mlilt.towers.registry import register_tower
from mlilt.training.trainer import train
from mlilt.training.config import TrainConfig
from tiny_towers import tiny_text_tower, tiny_timm_vit

runner = CliRunner()


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    register_tower(tiny_text_tower())
    register_tower(tiny_timm_vit())
    root = tmp_path_factory.mktemp("api")
    generate_demo(root / "data", ["sw"], n=40, image_size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLILT_CACHE", str(root / "cache"))
        train(TrainConfig(lang="sw", data=str(root / "data" / "sw" / "train.jsonl"), out=str(root / "sw"),
                          text_tower="tiny-bert-0", image_tower="tiny-timm-vit", epochs=1, batch_size=8))
    return root


def test_encode_image_accepts_paths_bytes_and_pil_alike(pack):
    model = mlilt.load(pack / "sw")
    path = next((pack / "data" / "images").iterdir())
    from_path = model.encode_image([path])
    from_bytes = model.encode_image([path.read_bytes()])
    from_pil = model.encode_image([Image.open(path)])
    assert from_path.shape == (1, 256)
    assert torch.allclose(from_path, from_bytes) and torch.allclose(from_path, from_pil, atol=1e-6)
    assert torch.allclose(from_path.norm(dim=-1), torch.ones(1))


def test_similarity_and_zero_shot_agree_with_the_embeddings(pack):
    model = mlilt.load(pack / "sw")
    images = sorted((pack / "data" / "images").iterdir())[:3]
    texts = ["mraba mdogo", "duara kubwa", "nyota"]
    sims = model.similarity(texts, images, lang="sw")
    assert sims.shape == (3, 3)
    expected = model.encode_text(texts, lang="sw") @ model.encode_image(images).t()
    assert torch.allclose(sims, expected, atol=1e-6)
    result = model.zero_shot_classify(images, texts, lang="sw", templates=("{}", "picha ya {}"))
    assert result.probs.shape == (3, 3)
    assert torch.allclose(result.probs.sum(-1), torch.ones(3), atol=1e-5)
    assert result.labels == [texts[i] for i in result.probs.argmax(-1).tolist()]


def test_encode_text_keeps_input_order_despite_length_sorting(pack):
    model = mlilt.load(pack / "sw")
    texts = ["mraba mdogo wa kijani juu upande wa kushoto na nyota", "duara", "nyota ndogo ya bluu"]
    together = model.encode_text(texts, lang="sw", batch_size=2)
    one_by_one = torch.cat([model.encode_text([t], lang="sw") for t in texts])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_lang_must_be_loaded(pack):
    model = mlilt.load(pack / "sw")
    with pytest.raises(UsageError, match="no pack for lang='de'"):
        model.encode_text(["ein Kreis"], lang="de")


def test_packs_info_verify_and_list(pack, monkeypatch):
    info = runner.invoke(app, ["packs", "info", str(pack / "sw")], terminal_width=200)
    assert info.exit_code == 0, info.output
    assert "ln+adapter" in info.output and "tiny-bert-0" in info.output
    verify = runner.invoke(app, ["packs", "verify", str(pack / "sw")])
    assert verify.exit_code == 0 and "ok" in verify.output
    (pack / "index.json").write_text(json.dumps({"packs": {"sw": {"path": "sw", "language": "sw",
                                                                  "method": "ln+adapter"}}}))
    monkeypatch.setenv("MLILT_PACKS", str(pack))
    listed = runner.invoke(app, ["packs", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "sw" in listed.output
    assert mlilt.load("sw").languages == ["sw"]


def test_packs_verify_fails_on_a_corrupt_pack(pack, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "langpack.json").write_text((pack / "sw" / "langpack.json").read_text())
    (broken / "langpack.safetensors").write_bytes((pack / "sw" / "langpack.safetensors").read_bytes()[:100])
    result = runner.invoke(app, ["packs", "verify", str(broken)])
    assert result.exit_code == 4
    assert "truncated" in result.output


def test_towers_list_names_the_offline_pair():
    result = runner.invoke(app, ["towers", "list"], terminal_width=200)
    assert result.exit_code == 0
    assert "me5-small" in result.output and "effnet-lite0" in result.output


def test_the_public_api_is_discoverable_and_a_model_prints_in_a_few_lines(pack):
    names = dir(mlilt)
    assert {"load", "list_packs", "MliltModel", "__version__"} <= set(names) and "annotations" not in names
    model = mlilt.load(pack / "sw")
    text = repr(model)
    assert len(text.splitlines()) <= 6, text
    assert "tiny-bert-0" in text and "sw: ln" in text and "loads on first use" in text
    model.encode_image([Image.new("RGB", (32, 32))])
    assert "loads on first use" not in repr(model)


def test_a_script_beside_a_checkout_named_mlilt_fails_saying_why(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "mlilt").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    script = tmp_path / "use.py"
    script.write_text("import mlilt\nprint(mlilt.load)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "found the checkout folder" in result.stderr and "not the mlilt package" in result.stderr


def test_eight_threads_on_one_model_get_the_one_thread_embeddings(pack):
    from concurrent.futures import ThreadPoolExecutor

    captions = [["a red circle"] * (1 + i % 3) + ["a small blue square and a star"] for i in range(8)]
    images = [[Image.new("RGB", (32 + 4 * i, 32), (30 * i, 100, 200))] for i in range(8)]
    alone = mlilt.load(pack / "sw")
    expected = [(alone.encode_text(c, lang="sw"), alone.encode_image(im)) for c, im in zip(captions, images)]
    shared = mlilt.load(pack / "sw")  # fresh: the threads race to build its image side

    def serve(i):
        return [(shared.encode_text(captions[i], lang="sw"), shared.encode_image(images[i])) for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(serve, range(8)))
    for i, rounds in enumerate(results):
        for text, image in rounds:
            assert torch.equal(text, expected[i][0]) and torch.equal(image, expected[i][1])
