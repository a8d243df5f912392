"""Benchmark readers on small synthetic trees in the real on-disk layouts."""
from __future__ import annotations

import gzip
import json
import warnings

import pytest
from PIL import Image

from mlilt.errors import DataError, UsageError
from mlilt.datasets import BENCHMARKS, benchmark_languages, load_benchmark, multi30k

XM_LANGS = ("ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt "
            "quz ro ru sv sw te th tr uk vi zh").split()


def _jpeg(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 10, 200)).save(path, "JPEG")


def _xm_entry(captions):
    return {"caption": captions, "caption/tokenized": [c.lower() for c in captions],
            "caption/tokenized/lowercase": [c.lower() for c in captions]}


# Image i has (i % 3) + 1 captions per language; image 3 is not on disk; image 1 lacks "de",
# image 2 lacks "de" and "fil".
XM_KEYS = [f"{i:016x}" for i in (0xA1, 0xB2, 0xC3, 0xD4, 0xE5)]
XM_MISSING_ON_DISK = 3
XM_LACKS = {1: {"de"}, 2: {"de", "fil"}}


def _write_xm3600(root):
    folder = root / "xm3600"
    folder.mkdir(parents=True)
    lines = []
    for i, key in enumerate(XM_KEYS):
        row = {"image/key": key, "image/locale": XM_LANGS[i]}
        for lang in XM_LANGS:
            if lang not in XM_LACKS.get(i, set()):
                row[lang] = _xm_entry([f"{lang} image {i} caption {j}" for j in range((i % 3) + 1)])
        lines.append(json.dumps(row, ensure_ascii=False))
        if i != XM_MISSING_ON_DISK:
            _jpeg(folder / "images" / f"{key}.jpg", 40 * i)
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_benchmark(*args, **kwargs)


def test_languages_listed():
    assert benchmark_languages("xm3600") == XM_LANGS and len(XM_LANGS) == 36
    assert benchmark_languages("xtd10") == "de en es fr it jp ko pl ru tr zh".split()
    assert benchmark_languages("multi30k") == ["en", "de", "fr", "cs"]
    assert set(BENCHMARKS) == {"xm3600", "xtd10", "multi30k"}
    with pytest.raises(UsageError, match="xm3600"):
        benchmark_languages("coco")


def test_xm3600_first_and_all(tmp_path):
    _write_xm3600(tmp_path)
    first = _load("xm3600", tmp_path, ["en", "de"], captions="first")
    every = _load("xm3600", tmp_path, ["en", "de"], captions="all")
    on_disk = [i for i in range(5) if i != XM_MISSING_ON_DISK]
    en_f, en_a = first["en"], every["en"]
    assert en_f.image_keys == [XM_KEYS[i] for i in on_disk]
    assert [im.path.name for im in en_f.images] == [f"{XM_KEYS[i]}.jpg" for i in on_disk]
    assert en_f.captions == [f"en image {i} caption 0" for i in on_disk]
    assert en_f.caption_image == [0, 1, 2, 3]
    n_all = sum((i % 3) + 1 for i in on_disk)  # 1 + 2 + 3 + 2
    assert len(en_a.captions) == n_all == 8
    assert en_a.caption_image == [0, 1, 1, 2, 2, 2, 3, 3]
    for text, idx in zip(en_a.captions, en_a.caption_image):
        assert f"image {on_disk[idx]} " in text
    assert en_f.counts["captions_dropped_not_first"] == n_all - 4
    assert en_a.counts["captions_dropped_not_first"] == 0
    assert en_f.counts["images_missing_on_disk"] == 1
    assert en_f.counts["images_without_language"] == 0
    # de: images 1 and 2 lack it, so they are out of the de gallery (and counted).
    de = every["de"]
    assert de.image_keys == [XM_KEYS[0], XM_KEYS[4]]
    assert de.caption_image == [0, 1, 1]
    assert de.counts["images_without_language"] == 2
    assert de.counts["images_missing_on_disk"] == 1


def test_xm3600_all_languages_and_warning(tmp_path):
    folder = _write_xm3600(tmp_path)
    with pytest.warns(UserWarning, match="images_missing_on_disk=1"):
        sets = load_benchmark("xm3600", folder)  # root may point at the folder itself
    assert list(sets) == XM_LANGS
    assert list(_load("xm3600", tmp_path, ["all"])) == XM_LANGS
    assert sets["fil"].counts["images_without_language"] == 1
    assert len(sets["fil"].images) == 3


def test_bad_arguments(tmp_path):
    _write_xm3600(tmp_path)
    with pytest.raises(UsageError, match="xx") as info:
        load_benchmark("xm3600", tmp_path, ["en", "xx"])
    assert "quz" in str(info.value) and "fil" in str(info.value)
    with pytest.raises(UsageError, match="first"):
        load_benchmark("xm3600", tmp_path, ["en"], captions="random")
    with pytest.raises(UsageError, match="jp"):
        load_benchmark("xtd10", tmp_path, ["ja"])


def test_xm3600_malformed_line(tmp_path):
    folder = _write_xm3600(tmp_path)
    path = folder / "captions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(2, '{"image/key": "00000000000000ff", "en": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"captions\.jsonl:3"):
        load_benchmark("xm3600", tmp_path, ["en"])


def test_xm3600_bad_caption_field(tmp_path):
    folder = _write_xm3600(tmp_path)
    path = folder / "captions.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"image/key": "00000000000000ff", "en": {"caption": "not a list"}}) + "\n")
    _jpeg(folder / "images" / "00000000000000ff.jpg", 1)
    with pytest.raises(DataError, match=r"captions\.jsonl:6.*caption"):
        load_benchmark("xm3600", tmp_path, ["en"])


def test_missing_root_lists_expected_paths(tmp_path):
    for name, marker in [("xm3600", "captions.jsonl"), ("xtd10", "test_image_names.txt"),
                         ("multi30k", "test_2016_flickr.txt")]:
        with pytest.raises(DataError) as info:
            load_benchmark(name, tmp_path / "nowhere")
        message = str(info.value)
        assert str(tmp_path / "nowhere" / name / marker) in message
        assert str(tmp_path / "nowhere" / marker) in message


XTD_LANGS = "de en es fr it jp ko pl ru tr zh".split()


def _write_xtd10(root, n=4, missing=2, image_dir="images"):
    folder = root / "xtd10"
    folder.mkdir(parents=True)
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(n)]
    (folder / "test_image_names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for lang in XTD_LANGS:
        text = "\n".join(f"{lang} caption of {name}" for name in names) + "\n"
        (folder / f"test_1kcaptions_{lang}.txt").write_text(text, encoding="utf-8")
    for i, name in enumerate(names):
        if i != missing:
            _jpeg(folder / image_dir / name, 30 * i)
    return folder, names


@pytest.mark.parametrize("image_dir", ["images", "train2014"])
def test_xtd10(tmp_path, image_dir):
    _, names = _write_xtd10(tmp_path, image_dir=image_dir)
    sets = _load("xtd10", tmp_path)
    assert list(sets) == XTD_LANGS
    jp = sets["jp"]
    kept = [n for i, n in enumerate(names) if i != 2]
    assert jp.image_keys == kept
    assert jp.captions == [f"jp caption of {n}" for n in kept]
    assert jp.caption_image == [0, 1, 2]
    assert jp.images[0].path.parent.name == image_dir
    assert jp.counts["images_missing_on_disk"] == 1
    assert _load("xtd10", tmp_path, ["en"], captions="all")["en"].captions == sets["en"].captions


def test_xtd10_mic_and_stair_caption_files(tmp_path):
    folder, names = _write_xtd10(tmp_path)
    for lang, subset in (("de", "MIC"), ("jp", "STAIR")):
        (folder / subset).mkdir(exist_ok=True)
        (folder / f"test_1kcaptions_{lang}.txt").rename(folder / subset / f"test_1kcaptions_{lang}.txt")
    sets = _load("xtd10", tmp_path, ["de", "jp"])
    assert sets["de"].captions[0] == f"de caption of {names[0]}"
    assert sets["jp"].captions[0] == f"jp caption of {names[0]}"
    (folder / "STAIR" / "test_1kcaptions_jp.txt").unlink()
    with pytest.raises(DataError, match="STAIR"):
        _load("xtd10", tmp_path, ["jp"])


def test_xtd10_line_count_mismatch(tmp_path):
    folder, _ = _write_xtd10(tmp_path)
    (folder / "test_1kcaptions_fr.txt").write_text("one\ntwo\n", encoding="utf-8")
    expected = r"test_1kcaptions_fr\.txt has 2 lines.*test_image_names\.txt lists 4"
    with pytest.raises(DataError, match=expected):
        load_benchmark("xtd10", tmp_path, ["fr"])
    assert len(_load("xtd10", tmp_path, ["de"])["de"].captions) == 3


def test_xtd10_missing_caption_file(tmp_path):
    folder, _ = _write_xtd10(tmp_path)
    (folder / "test_1kcaptions_ko.txt").unlink()
    with pytest.raises(DataError, match="test_1kcaptions_ko.txt"):
        load_benchmark("xtd10", tmp_path, ["ko"])


def _write_multi30k(root, image_dir="flickr30k-images"):
    folder = root / "multi30k"
    folder.mkdir(parents=True)
    names = [f"{1000 + i}.jpg" for i in range(3)]
    (folder / "test_2016_flickr.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for lang in ("en", "de", "fr"):
        text = "\n".join(f"{lang}: picture {n}" for n in names) + "\n"
        (folder / f"test_2016_flickr.{lang}").write_text(text, encoding="utf-8")
    # cs as shipped by the official repository: gzipped, with one empty caption.
    cs = "\n".join(["cs: a", "", "cs: c"]) + "\n"
    (folder / "test_2016_flickr.cs.gz").write_bytes(gzip.compress(cs.encode("utf-8")))
    for i, name in enumerate(names):
        _jpeg(folder / image_dir / name, 50 * i)
    return folder, names


def test_multi30k(tmp_path):
    _, names = _write_multi30k(tmp_path)
    sets = _load("multi30k", tmp_path, captions="all")
    assert list(sets) == ["en", "de", "fr", "cs"]
    de = sets["de"]
    assert de.image_keys == names and de.caption_image == [0, 1, 2]
    assert de.captions[1] == "de: picture 1001.jpg"
    assert de.counts["images_missing_on_disk"] == 0
    cs = sets["cs"]
    assert cs.captions == ["cs: a", "cs: c"] and cs.image_keys == [names[0], names[2]]
    assert cs.caption_image == [0, 1]
    assert cs.counts["captions_empty"] == 1 and cs.counts["images_without_language"] == 1


def test_multi30k_verify_and_one_ref_per_image(tmp_path):
    folder, names = _write_multi30k(tmp_path)
    sets = _load("multi30k", tmp_path)
    assert sets["en"].images[0] is sets["de"].images[0]  # shared by every language: hashed once
    (folder / "flickr30k-images" / names[1]).unlink()
    report = multi30k.verify(tmp_path)
    assert report.missing_images == [names[1]] and report.found_images == 2 and not report.errors
    assert not report.ok and "expected 1000" in report.summary()


def test_lone_language_string(tmp_path):
    _write_multi30k(tmp_path)
    assert list(_load("multi30k", tmp_path, "all")) == ["en", "de", "fr", "cs"]
    assert list(_load("multi30k", tmp_path, "fr")) == ["fr"]
    with pytest.raises(UsageError, match="no language"):
        load_benchmark("multi30k", tmp_path, [])
