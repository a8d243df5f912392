"""open_clip- and CLIP_benchmark-compatibility: a pack as an open_clip model gives mlilt's
embeddings; CLIP_benchmark's own dataset and metric code on it give `mlilt eval`'s recalls on
the same synthetic XM3600 tree; result files in CLIP_benchmark's format load in its `build`."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.evaluation.evaluate import evaluate
from tiny_towers import train_tiny_pack

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cnn_towers")
runner = CliRunner()
WORDS = "duara nyekundu mraba bluu kubwa ndogo na".split()


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return train_tiny_pack(tmp_path_factory.mktemp("clipbench"))


@pytest.fixture(scope="module")
def xm3600(tmp_path_factory):
    """An XM3600 tree in its official layout: 12 images, Swahili captions (the first is used)."""
    root = tmp_path_factory.mktemp("xm")
    folder = root / "xm3600"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(12):
        key = f"{i + 0xA0:016x}"
        Image.new("RGB", (40, 40), ((37 * i) % 256, (91 * i) % 256, 200 - 10 * i)).save(folder / "images" / f"{key}.jpg")
        captions = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)), "pili"]
        lines.append(json.dumps({"image/key": key, "image/locale": "sw",
                                 "sw": {"caption": captions, "caption/tokenized": captions}}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_the_open_clip_style_model_gives_the_packs_embeddings(pack):
    model, preprocess_train, preprocess = mlilt.create_model_and_transforms(pack)
    tokenizer = mlilt.get_tokenizer(model)
    loaded = mlilt.load(pack)
    captions = ["duara nyekundu", "mraba mdogo wa bluu na duara kubwa", "na"]
    tokens = tokenizer(captions)
    assert tokens.dtype == torch.long and tokens.shape[0] == 3
    torch.testing.assert_close(model.encode_text(tokens), loaded.encode_text(captions, lang="sw"))
    images = [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(3)]
    pixels = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(model.encode_image(pixels), loaded.encode_image(images))
    image_features, text_features, scale = model(pixels, tokens)
    assert image_features.shape == (3, 16) and text_features.shape == (3, 16)
    assert float(scale) == pytest.approx(loaded.logit_scale, rel=1e-5) and preprocess_train is preprocess


def test_clip_benchmark_on_a_pack_gives_mlilt_evals_recalls(pack, xm3600):
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    model, _, preprocess = mlilt.create_model_and_transforms(pack)
    dataset = build_dataset("crossmodal3600", root=str(xm3600), transform=preprocess, split="test", language="sw",
                            task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=get_dataset_collate_fn("crossmodal3600"))
    theirs = zeroshot_retrieval.evaluate(model, loader, mlilt.get_tokenizer(model), "cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    ours = evaluate("xm3600", [str(pack)], root=str(xm3600), langs=["sw"], captions="first")[0].metrics
    for key, value in theirs.items():
        assert ours[key] / 100 == pytest.approx(value, abs=1e-6), key


def test_clip_benchmark_format_results_load_in_its_build(pack, xm3600, tmp_path):
    from clip_benchmark.cli import main as clip_benchmark_main

    out = tmp_path / "results"
    result = runner.invoke(app, ["eval", "--benchmark", "xm3600", "--root", str(xm3600), "--pack", str(pack),
                                 "--langs", "sw", "--out", str(out), "--format", "clip_benchmark"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["crossmodal3600_sw_sw_sw_zeroshot_retrieval.json"]
    record = json.loads(files[0].read_text())
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert record["dataset"] == "crossmodal3600" and all(0 <= v <= 1 for v in record["metrics"].values())
    csv = tmp_path / "benchmark.csv"
    import sys
    argv, sys.argv = sys.argv, ["clip_benchmark", "build", str(files[0]), "--output", str(csv)]
    try:
        clip_benchmark_main()
    finally:
        sys.argv = argv
    table = csv.read_text().splitlines()
    assert "crossmodal3600" in table[1] and "image_retrieval_recall@5" in table[0]
    bad = runner.invoke(app, ["eval", "--benchmark", "xm3600", "--root", str(xm3600), "--pack", str(pack),
                              "--out", str(out), "--format", "csv"])
    assert bad.exit_code != 0 and "--format 'csv'" in bad.output
