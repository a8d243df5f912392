"""Leak detection between a training set and a benchmark, on small real files."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
from PIL import Image
from sacrebleu.metrics import CHRF
from typer.testing import CliRunner

from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.datasets.leakage import candidates, exclude_leaks, find_leaks
from mlilt.data.pairs import read_pairs
from mlilt.errors import UsageError
from test_benchmarks import XM_KEYS, _write_xm3600

UNRELATED = [
    "two dogs playing fetch on a sandy beach at sunset",
    "a bowl of noodle soup with chopsticks beside it",
    "an old man reading a newspaper on a park bench",
    "children riding bicycles down a rainy street",
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _png(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, 30, 90)).save(path, "PNG")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak") / "demo"
    generate_demo(root, ["en"], n=30, image_size=32)
    return root


def _test_rows(demo):
    return [json.loads(line) for line in (demo / "en" / "test.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def leaky(tmp_path, demo):
    """A training file: exact copy (index 0), one-word change (1), unrelated (2-5), image copy (6)."""
    tests = _test_rows(demo)
    longest = max(tests, key=lambda r: len(r["caption"]))
    words = longest["caption"].split()
    swap = next(i for i, w in enumerate(words) if w in ("red", "blue", "yellow", "white", "black", "green"))
    words[swap] = "purple"
    edited = " ".join(words)
    copied = tests[0]
    shutil.copyfile(demo / "en" / copied["image"], tmp_path / "renamed_copy.png")
    rows = [{"image": "img0.png", "caption": "  " + copied["caption"].upper() + " "},
            {"image": "img1.png", "caption": edited}]
    rows += [{"image": f"img{i + 2}.png", "caption": text} for i, text in enumerate(UNRELATED)]
    rows.append({"image": "renamed_copy.png", "caption": "a cat asleep on a warm windowsill"})
    for i in range(len(UNRELATED) + 2):
        _png(tmp_path / f"img{i}.png", 20 * i)
    _jsonl(tmp_path / "train.jsonl", rows)
    return {"path": tmp_path / "train.jsonl", "exact": copied["caption"], "edited_from": longest["caption"],
            "edited": edited, "image": copied["image"].rsplit("/", 1)[-1]}


def test_demo_leaks_found(leaky, demo):
    train = read_pairs(leaky["path"])
    report = find_leaks(train, "demo", demo, "en")
    assert report.leaky_indices == [0, 1, 6]
    assert report.counts == {"caption_leaks": 2, "image_leaks": 1, "leaky_pairs": 3}
    exact, edited = report.caption_leaks
    assert exact.index == 0 and exact.score == 100.0 and exact.benchmark_caption == leaky["exact"]
    assert exact.train_source.endswith("train.jsonl:1")
    assert edited.index == 1 and 80.0 <= edited.score < 100.0
    assert edited.benchmark_caption == leaky["edited_from"] and edited.train_caption == leaky["edited"]
    train_caption, bench_caption, score, source = edited
    assert (train_caption, bench_caption, score) == (leaky["edited"], leaky["edited_from"], edited.score)
    assert source.endswith("train.jsonl:2")
    (image,) = report.image_leaks
    assert image.index == 6 and image.benchmark_key == leaky["image"] and image.train_source.endswith(":7")
    assert "2 caption leak(s), 1 image leak(s), 3 pair(s) to drop" in report.summary()


def test_exclude_leaks(leaky, demo):
    train = read_pairs(leaky["path"])
    report = find_leaks(train, "demo", demo, "en")
    kept = exclude_leaks(train, report)
    assert len(kept) == len(train) - 3 and kept.skipped["leak"] == 3
    assert [p.caption for p in kept.pairs] == UNRELATED
    assert len(train) == 7  # the original is untouched
    assert find_leaks(kept, "demo", demo, "en").clean
    assert exclude_leaks(kept, find_leaks(kept, "demo", demo, "en")).skipped == {"leak": 3}


def test_threshold(leaky, demo):
    train = read_pairs(leaky["path"])
    edited = find_leaks(train, "demo", demo, "en").caption_leaks[1].score
    strict = find_leaks(train, "demo", demo, "en", threshold=min(100.0, edited + 0.5))
    assert [leak.index for leak in strict.caption_leaks] == [0]
    assert strict.leaky_indices == [0, 6]  # image leaks do not depend on the threshold
    edge = find_leaks(train, "demo", demo, "en", threshold=edited)  # ">=": a score equal to it is flagged
    assert [leak.index for leak in edge.caption_leaks] == [0, 1]
    loose = find_leaks(train, "demo", demo, "en", threshold=0.0)
    assert {0, 1} <= {leak.index for leak in loose.caption_leaks}
    with pytest.raises(UsageError):
        find_leaks(train, "demo", demo, "en", threshold=120)


def test_custom_benchmark(leaky, demo):
    train = read_pairs(leaky["path"])
    report = find_leaks(train, "custom", None, "en", data=demo / "en" / "test.jsonl")
    assert report.leaky_indices == [0, 1, 6]
    with pytest.raises(UsageError):
        find_leaks(train, "custom", None, "en")
    with pytest.raises(UsageError):
        find_leaks(train, "coco", demo, "en")


def test_prefilter_matches_brute_force(tmp_path):
    """Templated captions (many near neighbours each): the candidates lose no pair >= 50."""
    root = tmp_path / "demo"
    generate_demo(root, ["en", "sw"], n=150, image_size=32)
    chrf = CHRF()
    for lang in ("en", "sw"):
        train = read_pairs(root / lang / "train.jsonl")
        norm = [" ".join(p.caption.casefold().split()) for p in read_pairs(root / lang / "test.jsonl").pairs]
        best = [max(chrf.sentence_score(" ".join(p.caption.casefold().split()), [b]).score for b in norm)
                for p in train.pairs]
        report = find_leaks(train, "demo", root, lang, threshold=50.0)
        found = {leak.index: leak.score for leak in report.caption_leaks}
        assert all(found[i] == pytest.approx(best[i]) for i in found)  # the best match, never a lesser one
        for threshold in (50.0, 70.0, 85.0):
            flagged = {i for i, score in found.items() if score >= threshold}
            assert flagged == {i for i, score in enumerate(best) if score >= threshold}


def test_candidates_floor_and_order():
    bench = ["a red circle on the left", "a blue square", "zzzz qqqq"]
    got = candidates(["a red circle on the right", "xxxx"], bench, k=2)
    assert got[0][0] == 0 and 2 not in got[0]
    assert got[1] == []


def test_xm3600_leaks(tmp_path):
    _write_xm3600(tmp_path / "bench")
    image = tmp_path / "bench" / "xm3600" / "images" / f"{XM_KEYS[2]}.jpg"
    shutil.copyfile(image, tmp_path / "mine.jpg")
    _png(tmp_path / "other.png", 7)
    _jsonl(tmp_path / "train.jsonl", [
        {"image": "other.png", "caption": "en image 2 caption 1"},
        {"image": "mine.jpg", "caption": UNRELATED[0]},
        {"image": "other.png", "caption": UNRELATED[1]},
    ])
    train = read_pairs(tmp_path / "train.jsonl")
    with warnings.catch_warnings():  # the fixture leaves one image off disk on purpose
        warnings.simplefilter("ignore")
        report = find_leaks(train, "xm3600", tmp_path / "bench", "en")
        de = find_leaks(train, "xm3600", tmp_path / "bench", "de", threshold=95)
    assert report.leaky_indices == [0, 1]
    (caption,) = report.caption_leaks
    assert caption.score == 100.0 and caption.benchmark_caption == "en image 2 caption 1"
    assert [(leak.index, leak.benchmark_key) for leak in report.image_leaks] == [(1, XM_KEYS[2])]
    # image 2 has no German caption, so it is not in the German gallery; "de ..." != "en ..."
    assert de.clean


def test_cli_exit_codes(leaky, demo, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "--data", str(leaky["path"]), "--against", "demo", "--root", str(demo),
                                    "--lang", "en"])
    assert result.exit_code == 1, result.output
    assert "caption leaks: 2, image leaks: 1" in result.output
    assert "100.0" in result.output and "leaks found" in result.output

    clean = tmp_path / "clean.jsonl"
    _jsonl(clean, [{"image": "img2.png", "caption": text} for text in UNRELATED])
    result = runner.invoke(app, ["data", "check", "--data", str(clean), "--against", "demo", "--root", str(demo),
                                    "--lang", "en"])
    assert result.exit_code == 0, result.output
    assert "clean" in result.output

    result = runner.invoke(app, ["data", "check", "--data", str(leaky["path"]), "--against", "demo", "--root", str(demo),
                                    "--threshold", "100", "--lang", "en"])
    assert result.exit_code == 1 and "caption leaks: 1, image leaks: 1" in result.output

    result = runner.invoke(app, ["data", "check", "--data", str(leaky["path"]), "--against", "nope", "--root", str(demo),
                                "--lang", "en"])
    assert result.exit_code == 2

    result = runner.invoke(app, ["data", "check", "--help"])
    assert result.exit_code == 0 and "Exit code 0" in result.output


def test_train_exclude_leaks_drops_them_and_records_it(leaky, demo, tmp_path):
    from mlilt.towers.registry import register_tower
    from mlilt.training.trainer import train
    from mlilt.training.config import TrainConfig
    from tiny_towers import tiny_text_tower, tiny_timm_cnn

    register_tower(tiny_text_tower())
    register_tower(tiny_timm_cnn())
    result = train(TrainConfig(lang="en", data=str(leaky["path"]), out=str(tmp_path / "pack"),
                               text_tower="tiny-bert-0", image_tower="tiny-timm-cnn", epochs=1, batch_size=2,
                               holdout=2, exclude_leaks="demo", leak_root=str(demo)))
    data = json.loads((result.pack / "langpack.json").read_text())["data"]
    assert data["skipped"]["leak"] == 3
    assert data["rows"] == 4  # 7 training pairs, 3 of them leaking
    with pytest.raises(UsageError, match="--leak-root"):
        TrainConfig(lang="en", data="x.jsonl", out="p", exclude_leaks="demo")
