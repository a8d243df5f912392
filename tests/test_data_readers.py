"""The data readers: every format, every documented bad input, and the image decoder."""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mlilt.data.images as image_module
from mlilt.data.images import MAX_PIXELS, ImageRef, image_id, load_image, verify_image
from mlilt.data.pairs import Pair, PairSet, read_pairs
from mlilt.errors import DataError, UsageError

# --------------------------------------------------------------------------- helpers


def png(path: Path, color=(200, 30, 30), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_jpeg(path: Path) -> Path:
    """A JPEG big enough that cutting it in half loses real image data."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def write_jsonl(path: Path, rows) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    """Three distinct images in tmp/imgs/."""
    return [png(tmp_path / "imgs" / f"{i}.png", color=(40 * i, 10, 90)) for i in range(3)]


# --------------------------------------------------------------------------- formats


def test_jsonl_reads_relative_absolute_and_aliases(tmp_path, images):
    data = write_jsonl(tmp_path / "caps.jsonl", [
        {"image": "imgs/0.png", "caption": "  a red\tsquare \n"},
        "",
        {"image_path": str(images[1]), "text": "a blue one", "lang": "en"},
        {"file": "imgs/2.png", "caption": "third"},
        {"filepath": "imgs/0.png", "caption": "again the first"},
    ])
    result = read_pairs(data)
    assert isinstance(result, PairSet) and result.source == str(data)
    assert [p.caption for p in result.pairs] == ["a red square", "a blue one", "third", "again the first"]
    assert [p.source for p in result.pairs] == [f"{data}:1", f"{data}:3", f"{data}:4", f"{data}:5"]
    assert result.pairs[0].image.path == images[0].resolve()
    assert result.pairs[1].lang == "en" and result.pairs[0].lang is None
    assert result.skipped == {}


def test_json_extension_and_bom_and_crlf(tmp_path, images):
    data = tmp_path / "caps.json"
    data.write_bytes(b"\xef\xbb\xbf" + b'{"image": "imgs/0.png", "caption": "x"}\r\n{"image": "imgs/1.png", "caption": "y"}\r\n')
    assert [p.caption for p in read_pairs(data).pairs] == ["x", "y"]


def test_csv_and_tsv(tmp_path, images):
    data = tmp_path / "sub" / "caps.csv"
    data.parent.mkdir()
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Filepath", "text", "lang"])
        writer.writerow(["../imgs/0.png", "a, quoted\ncaption", "de"])
        writer.writerow(["../imgs/1.png", "plain", ""])
    result = read_pairs(data)
    assert [p.caption for p in result.pairs] == ["a, quoted caption", "plain"]
    assert [p.source for p in result.pairs] == [f"{data}:2", f"{data}:4"]
    assert [p.lang for p in result.pairs] == ["de", None]
    assert result.pairs[0].image.path == images[0].resolve()

    tsv = tmp_path / "caps.tsv"
    tsv.write_text("image\tcaption\nimgs/2.png\tthird, with comma\n", encoding="utf-8")
    assert read_pairs(tsv).pairs[0].caption == "third, with comma"


def test_explicit_columns(tmp_path, images):
    data = write_jsonl(tmp_path / "c.jsonl", [{"pic": "imgs/0.png", "desc": "x", "language": "fr", "caption": "not me"}])
    pair = read_pairs(data, image_column="pic", caption_column="desc", lang_column="language").pairs[0]
    assert (pair.caption, pair.lang) == ("x", "fr")
    with pytest.raises(DataError, match=r"c\.jsonl:1: missing image field \(expected one of: img; found: pic"):
        read_pairs(data, image_column="img")
    with pytest.raises(UsageError):
        read_pairs(data, image_column="")


def _tiny_dataset(datasets):
    features = datasets.Features({
        "image": datasets.Image(),
        "sentences": datasets.Sequence(datasets.Value("string")),
        "lang": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({
        "image": [{"bytes": png_bytes((1, 2, 3)), "path": None}, {"bytes": png_bytes((9, 9, 9)), "path": "b.png"}],
        "sentences": [["first cap", " second  cap "], ["other"]],
        "lang": ["en", "en"],
    }, features=features)


def test_hf_save_to_disk_and_parquet(tmp_path, hf_cache):
    dataset = _tiny_dataset(hf_cache)
    dataset.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    dataset.to_parquet(str(tmp_path / "pq" / "part.parquet"))
    for source in (tmp_path / "disk", tmp_path / "pq" / "part.parquet", tmp_path / "pq"):
        result = read_pairs(source, lang="en")
        assert [p.caption for p in result.pairs] == ["first cap", "second cap", "other"], source
        assert result.pairs[0].image.data == png_bytes((1, 2, 3))
        assert result.pairs[0].image == result.pairs[1].image
        assert result.pairs[2].source == f"{source} row 1"
        assert load_image(result.pairs[2].image).getpixel((0, 0)) == (9, 9, 9)
    assert read_pairs(tmp_path / "disk").summary() == {
        **read_pairs(tmp_path / "pq").summary(), "source": str(tmp_path / "disk")}


def test_hf_path_column_and_dataset_dict_split(tmp_path, hf_cache, images):
    dataset = hf_cache.Dataset.from_dict({"picture": ["../imgs/0.png", "../imgs/1.png"], "text": ["a", "b"]})
    hf_cache.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "dd"))
    result = read_pairs(f"{tmp_path / 'dd'}:test", image_column="picture")
    assert [(p.caption, p.image.path) for p in result.pairs] == [("b", images[1].resolve())]
    assert len(read_pairs(tmp_path / "dd", image_column="picture")) == 2  # "train" by default
    with pytest.raises(UsageError, match="splits: train, test"):
        read_pairs(f"{tmp_path / 'dd'}:valid", image_column="picture")
    with pytest.raises(DataError, match="no column 'nope'"):
        read_pairs(tmp_path / "dd", image_column="nope")


def test_hf_bad_rows_name_the_row(tmp_path, hf_cache):
    dataset = hf_cache.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"junk", "path": None}], "caption": ["ok", "  "]},
        features=hf_cache.Features({"image": hf_cache.Image(), "caption": hf_cache.Value("string")}),
    )
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 1: caption is empty"):
        read_pairs(tmp_path / "d.parquet")
    dataset = dataset.map(lambda row: {"caption": row["caption"].strip() or "fine"})
    dataset.to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match=r"e\.parquet row 1: image <embedded>: not a readable image"):
        read_pairs(tmp_path / "e.parquet")
    assert read_pairs(tmp_path / "e.parquet", skip_bad=True).skipped == {"unreadable_image": 1}


def test_hub_name_failure_is_a_data_error(monkeypatch, hf_cache):
    import huggingface_hub.constants

    monkeypatch.setattr(hf_cache.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nobody/no-such-dataset"):
        read_pairs("nobody/no-such-dataset:validation")


# --------------------------------------------------------------------------- languages


def test_lang_filter_keeps_matching_and_unlabelled_rows(tmp_path, images):
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"image": "imgs/0.png", "caption": "hello", "lang": "en"},
        {"image": "imgs/1.png", "caption": "hallo", "lang": "de"},
        {"image": "imgs/2.png", "caption": "habari"},
        {"image": "imgs/missing.png", "caption": "not checked: other language", "lang": "de"},
    ])
    result = read_pairs(data, lang="EN")
    assert [(p.caption, p.lang) for p in result.pairs] == [("hello", "en"), ("habari", "EN")]


def test_no_rows_for_lang_lists_languages(tmp_path, images):
    rows = [{"image": "imgs/0.png", "caption": f"c{i}", "lang": "en"} for i in range(3)]
    rows += [{"image": "imgs/1.png", "caption": "d", "lang": "de"}]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_pairs(data, lang="sw")
    assert str(info.value) == f"no rows for --lang sw in {data} (languages present: en 3, de 1)"


# --------------------------------------------------------------------------- bad input


def _bad_image_cases(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    good = png(folder / "full.png", size=(64, 64)).read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    jpeg = noisy_jpeg(folder / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_bytes(b"not an image at all")
    return {name: folder / name for name in ("zero.png", "cut.png", "cut.jpg", "text.png")}


BAD_LINES = [
    ("malformed_json", '{"image": "ok.png", "caption": ', "malformed JSON at column"),
    ("not_object", '["ok.png", "a caption"]', "expected a JSON object, got list"),
    ("missing_field", '{"image": "ok.png", "label": "x"}',
     "missing caption field (expected one of: caption, text, sentences, captions; found: image, label)"),
    ("missing_field", '{"caption": "x"}',
     "missing image field (expected one of: image, image_path, file, filepath; found: caption)"),
    ("empty_caption", '{"image": "ok.png", "caption": "  \\t "}', "caption is empty or only whitespace"),
    ("bad_caption", '{"image": "ok.png", "caption": 42}', "caption must be a string (or a list of strings), got int"),
    ("bad_caption", '{"image": "ok.png", "caption": null}', "got null"),
    ("bad_caption", '{"image": "ok.png", "caption": "\\ud800"}', "caption is not valid UTF-8 text"),
    ("bad_image", '{"image": 7, "caption": "x"}', "image must be a path string, got int"),
    ("missing_image", '{"image": "~no-such-user-x/a.png", "caption": "x"}', "image file not found"),
    ("missing_image", '{"image": "a\\u0000b.png", "caption": "x"}', "image file not found"),
    ("missing_image", '{"image": "nope/none.png", "caption": "x"}', "image file not found: {tmp}/nope/none.png"),
    ("unreadable_image", '{"image": "bad/zero.png", "caption": "x"}', "empty file (0 bytes)"),
    ("unreadable_image", '{"image": "bad/cut.png", "caption": "x"}', "{tmp}/bad/cut.png"),
    ("unreadable_image", '{"image": "bad/cut.jpg", "caption": "x"}', "corrupt or truncated image"),
    ("unreadable_image", '{"image": "bad/text.png", "caption": "x"}', "not a readable image"),
]


@pytest.mark.parametrize("reason,line,expected", BAD_LINES, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_LINES)])
def test_bad_jsonl_line_names_file_and_line(tmp_path, reason, line, expected):
    png(tmp_path / "ok.png")
    _bad_image_cases(tmp_path / "bad")
    data = tmp_path / "c.jsonl"
    data.write_text('{"image": "ok.png", "caption": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_pairs(data)
    message = str(info.value)
    assert message.startswith(f"{data}:3: "), message
    assert expected.format(tmp=tmp_path) in message
    result = read_pairs(data, skip_bad=True)
    assert result.skipped == {reason: 1}
    assert [p.caption for p in result.pairs] == ["fine"]


def test_bad_encoding_names_line(tmp_path):
    png(tmp_path / "ok.png")
    data = tmp_path / "c.jsonl"
    data.write_bytes(b'{"image": "ok.png", "caption": "fine"}\n{"image": "ok.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{data}:2: not valid UTF-8"):
        read_pairs(data)
    assert read_pairs(data, skip_bad=True).skipped == {"bad_encoding": 1}
    data.write_bytes('{"image": "ok.png", "caption": "x"}'.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_pairs(data)


def test_check_images_false_skips_decoding_but_not_existence(tmp_path):
    bad = _bad_image_cases(tmp_path / "bad")
    data = write_jsonl(tmp_path / "c.jsonl", [{"image": str(bad["cut.jpg"]), "caption": "x"}])
    assert len(read_pairs(data, check_images=False)) == 1
    write_jsonl(data, [{"image": "gone.png", "caption": "x"}])
    with pytest.raises(DataError, match="image file not found"):
        read_pairs(data, check_images=False)


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: file is empty"):
        read_pairs(empty)
    with pytest.raises(DataError, match="no such file or folder"):
        read_pairs(tmp_path / "absent.jsonl")
    other = tmp_path / "caps.txt"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(UsageError, match=r"unsupported format '\.txt'.*supported: \.jsonl"):
        read_pairs(other)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", '{"caption": "x"}'])
    with pytest.raises(DataError, match=r"no valid rows in .*skipped: malformed_json 1, missing_field 1.*bad\.jsonl:1"):
        read_pairs(all_bad, skip_bad=True)
    header_only = tmp_path / "h.csv"
    header_only.write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_pairs(header_only)


def test_bad_csv_rows(tmp_path):
    png(tmp_path / "ok.png")
    data = tmp_path / "c.csv"
    data.write_text("picture,caption\nok.png,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{data}:1: header has no image column .*found: picture, caption"):
        read_pairs(data)
    data.write_text("image\tcaption\nok.png\tx\n", encoding="utf-8")
    with pytest.raises(DataError, match="tab-separated"):
        read_pairs(data)
    data.write_bytes(b'image,caption\nok.png,fine\nok.png,"multi\nline"\nok.png,caf\xe9\nok.png,a,b\nok.png, \n')
    with pytest.raises(DataError, match=rf"{data}:5: caption is not valid UTF-8"):
        read_pairs(data)
    result = read_pairs(data, skip_bad=True)
    assert [p.caption for p in result.pairs] == ["fine", "multi line"]
    assert result.skipped == {"bad_encoding": 1, "malformed_row": 1, "empty_caption": 1}


# --------------------------------------------------------------------------- summary and split


def test_summary_counts_and_content_hash(tmp_path, images):
    rows = [
        {"image": "imgs/0.png", "caption": "a", "lang": "en"},
        {"image": "imgs/0.png", "caption": "a", "lang": "en"},
        {"image": "imgs/1.png", "caption": "b"},
    ]
    summary = read_pairs(write_jsonl(tmp_path / "c.jsonl", rows)).summary()
    assert {k: summary[k] for k in ("rows", "images", "langs", "skipped", "duplicates")} == {
        "rows": 3, "images": 2, "langs": {"en": 2, "und": 1}, "skipped": {}, "duplicates": 1}
    os.rename(images[1], tmp_path / "imgs" / "renamed.png")
    rows[2]["image"] = "imgs/renamed.png"
    assert read_pairs(write_jsonl(tmp_path / "d.jsonl", rows)).summary()["sha256"] == summary["sha256"]
    rows[2]["caption"] = "b!"
    assert read_pairs(write_jsonl(tmp_path / "e.jsonl", rows)).summary()["sha256"] != summary["sha256"]


def test_split_is_deterministic_and_keeps_images_together(tmp_path):
    rows = []
    for i in range(20):
        png(tmp_path / "imgs" / f"{i}.png", color=(i, 2 * i, 3))
        rows += [{"image": f"imgs/{i}.png", "caption": f"image {i} caption {k}"} for k in range(3)]
    pairs = read_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    train, held = pairs.split(0.25, seed=1)
    assert len(held) == 15 and len(train) == 45
    assert {p.image.id for p in train}.isdisjoint({p.image.id for p in held})
    again_train, again_held = pairs.split(0.25, seed=1)
    assert again_held.pairs == held.pairs and again_train.pairs == train.pairs
    assert pairs.split(0.25, seed=2)[1].pairs != held.pairs
    assert len(pairs.split(2, seed=0)[1]) == 6
    # Order does not matter: shuffled input holds out the same images.
    reversed_set = PairSet(list(reversed(pairs.pairs)), "rev")
    assert {p.image.id for p in reversed_set.split(0.25, seed=1)[1]} == {p.image.id for p in held}
    for bad in (0.0, 1.0, 0, 20, -1, True, "0.1"):
        with pytest.raises(UsageError):
            pairs.split(bad, seed=0)


# --------------------------------------------------------------------------- images


def test_load_image_modes(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(cmyk)
    assert load_image(cmyk).mode == "RGB"
    r, g, b = load_image(cmyk).getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "pt.png", transparency=1)
    assert load_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (0, 0, 255)
    Image.new("LA", (3, 3), (0, 128)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)

    sixteen = Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "16.png")
    loaded = load_image(tmp_path / "16.png")
    assert loaded.mode == "RGB"
    assert [loaded.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 255, 128, 1]
    assert load_image(png(tmp_path / "l.png", color=77, mode="L")).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(png_bytes((5, 6, 7))).getpixel((0, 0)) == (5, 6, 7)


def test_load_image_bad_files_name_the_file(tmp_path):
    bad = _bad_image_cases(tmp_path)
    for name, path in bad.items():
        with pytest.raises(DataError, match=str(path)):
            load_image(path, source="caps.jsonl:7")
        with pytest.raises(DataError, match="caps.jsonl:7"):
            load_image(path, source="caps.jsonl:7")
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims a huge size; PIL reads the size before any pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns past MAX_PIXELS, errors past twice that
def test_decompression_bomb_is_refused(tmp_path, side):
    assert side * side > MAX_PIXELS
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    for check in (load_image, verify_image):
        with pytest.raises(DataError, match=rf"{bomb}.*pixels"):
            check(bomb)


def test_image_id_is_a_cached_content_hash(tmp_path):
    a = png(tmp_path / "a.png")
    b = tmp_path / "copy.png"
    b.write_bytes(a.read_bytes())
    assert image_id(a) == image_id(b) == image_id(a.read_bytes()) == ImageRef.from_path(a).id
    before = image_id(a)
    png(a, color=(1, 1, 1))
    os.utime(a, ns=(1, 1))
    assert image_id(a) != before
    with pytest.raises(DataError, match="gone.png"):
        image_id(tmp_path / "gone.png")


def test_image_id_is_memoised_on_the_ref_and_pairs_of_one_image_share_it(tmp_path, monkeypatch):
    a = png(tmp_path / "a.png")
    hashed = []
    real = image_module._file_sha256
    monkeypatch.setattr(image_module, "_file_sha256", lambda path: hashed.append(path) or real(path))
    ref = ImageRef.from_path(a)
    first = image_id(ref)
    assert image_id(ref) == first and len(hashed) == 1  # asked again: a stat, no second hash
    png(a, color=(1, 1, 1))
    os.utime(a, ns=(1, 1))
    assert image_id(ref) != first and len(hashed) == 2
    rows = [{"image": "a.png", "caption": "one"}, {"image": "a.png", "caption": "two"}]
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows), check_images=False).pairs
    assert pairs[0].image is pairs[1].image


# --------------------------------------------------------------------------- fuzz

FIELD = st.sampled_from(["image", "caption", "text", "lang", "file", "sentences", "other"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["ok.png", "~nobody-here/x.png", "a\x00b", "http://host/x.png", ".", "/"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELD, inner, max_size=4),
    max_leaves=8,
)


def _read_only_data_errors(content: bytes, name: str, **kwargs) -> None:
    with tempfile.TemporaryDirectory() as folder:
        png(Path(folder) / "ok.png")
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            result = read_pairs(path, **kwargs)
        except DataError:
            return
        assert all(isinstance(p, Pair) and p.caption for p in result.pairs)
        result.summary()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.binary(max_size=300),
    skip_bad=st.booleans(),
    name=st.sampled_from(["f.jsonl", "f.csv", "f.tsv"]),
)
def test_fuzz_random_bytes_only_raise_data_error(content, skip_bad, name):
    _read_only_data_errors(content, name, skip_bad=skip_bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(JSON_VALUES | st.just({"image": "ok.png", "caption": "fine"}), max_size=6),
    skip_bad=st.booleans(),
)
def test_fuzz_random_json_lines_only_raise_data_error(lines, skip_bad):
    content = "\n".join(json.dumps(line) for line in lines).encode("utf-8")
    _read_only_data_errors(content, "f.jsonl", skip_bad=skip_bad, lang=None if skip_bad else "en")
